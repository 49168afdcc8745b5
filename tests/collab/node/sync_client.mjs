// A stock y-websocket client (y-websocket's WebsocketProvider on the ws package) for
// the collab server's tests. Usage:
//
//   node sync_client.mjs URL ROOM OFFLINE_BYTES WATCH_SECONDS
//
// It fills the shared text with OFFLINE_BYTES characters before connecting (an offline
// state; 0 for none), connects, and reports on stdout, as one JSON line, what happened
// within WATCH_SECONDS after the first sync (or after the first close, if it never
// syncs): how many times it connected, the close codes it saw, the text's length and
// a checksum of it.
import { createHash } from 'node:crypto'
import WebSocket from 'ws'
import { WebsocketProvider } from 'y-websocket'
import * as Y from 'yjs'

const [url, room, offline, watch] = process.argv.slice(2)
const doc = new Y.Doc()
const text = doc.getText('text')
if (Number(offline) > 0) {
  text.insert(0, 'o'.repeat(Number(offline)))
}
const report = { connects: 0, closes: [], synced: false }
const provider = new WebsocketProvider(url, room, doc, {
  WebSocketPolyfill: WebSocket,
  disableBc: true,
  maxBackoffTime: 500,
  connect: false // listeners first: the first attempt counts too
})
provider.on('status', ({ status }) => {
  if (status === 'connecting') report.connects += 1
})
provider.on('connection-close', (event) => {
  if (event) report.closes.push([event.code, event.reason.toString()])
})
let finishing = null
const finish = () => {
  if (finishing) return
  finishing = setTimeout(() => {
    const content = text.toString()
    report.length = content.length
    report.sha256 = createHash('sha256').update(content).digest('hex')
    provider.destroy()
    process.stdout.write(JSON.stringify(report) + '\n')
    process.exit(0)
  }, Number(watch) * 1000)
}
provider.on('sync', (synced) => {
  if (synced) {
    report.synced = true
    finish()
  }
})
provider.on('connection-close', finish)
provider.connect()
