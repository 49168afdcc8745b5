// Browser side of the collab example: one shared plain-text document per name,
// synchronised with Yjs over a WebSocket at /doc/<name>, edited in CodeMirror 6.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next'
import { Compartment, EditorState } from '@codemirror/state'
import {
  EditorView,
  drawSelection,
  highlightActiveLine,
  highlightActiveLineGutter,
  highlightSpecialChars,
  keymap,
  lineNumbers,
  placeholder
} from '@codemirror/view'
import { defaultKeymap } from '@codemirror/commands'

const DEFAULT_DOC = 'welcome'

const ADJECTIVES = [
  'Amber', 'Brave', 'Calm', 'Clever', 'Cosy', 'Eager', 'Gentle', 'Happy', 'Jolly', 'Kind',
  'Lucky', 'Merry', 'Nimble', 'Quiet', 'Sunny', 'Swift', 'Tidy', 'Witty'
]
const ANIMALS = [
  'Badger', 'Beaver', 'Crane', 'Dolphin', 'Falcon', 'Fox', 'Hedgehog', 'Heron', 'Koala',
  'Lynx', 'Otter', 'Owl', 'Panda', 'Puffin', 'Robin', 'Seal', 'Wombat', 'Wren'
]
const COLORS = [
  '#e8590c', '#d6336c', '#ae3ec9', '#7048e8', '#4263eb', '#1c7ed6',
  '#0c8599', '#099268', '#2f9e44', '#66a80f', '#f08c00', '#c2255c'
]

// After a close code in 4400–4499 the provider stops (no reconnecting): these say why.
const STOPPED_BECAUSE = {
  4400: 'This document name cannot be used. Open another one above.',
  4422: 'This document cannot be opened: the server cannot read what it has stored. ' +
    'The problem is in the server log for its operator. Editing is off until it is fixed.'
}

function stopMessage (close) {
  if (!close) return 'The server closed the connection and asked not to retry.'
  const known = STOPPED_BECAUSE[close.code]
  if (known) return known
  return `The server closed the connection (${close.code}${close.reason ? ': ' + close.reason : ''}) and asked not to retry.`
}

const pick = (list) => list[Math.floor(Math.random() * list.length)]

/** The document name: `/d/<name>` (URL-encoded), anything else means the default. */
function docNameFromLocation () {
  const match = /^\/d\/(.+)$/.exec(window.location.pathname)
  if (!match) return DEFAULT_DOC
  let name
  try {
    name = decodeURIComponent(match[1])
  } catch {
    name = match[1]
  }
  name = name.trim()
  return name === '' ? DEFAULT_DOC : name
}

function docPath (name) {
  return '/d/' + encodeURIComponent(name)
}

/**
 * Who this tab is. Kept in sessionStorage so that a reload keeps the name while two
 * tabs of the same browser still show up as two people. `?user=` overrides the name.
 */
function loadIdentity () {
  const stored = readStoredIdentity()
  const fromQuery = new URLSearchParams(window.location.search).get('user')
  const identity = {
    name: (fromQuery && fromQuery.trim()) || stored?.name || `${pick(ADJECTIVES)} ${pick(ANIMALS)}`,
    color: stored && isColor(stored.color) ? stored.color : pick(COLORS)
  }
  saveIdentity(identity)
  return identity
}

function readStoredIdentity () {
  try {
    const value = JSON.parse(window.sessionStorage.getItem('collab-user') || 'null')
    return value && typeof value.name === 'string' ? value : null
  } catch {
    return null
  }
}

function saveIdentity (identity) {
  try {
    window.sessionStorage.setItem('collab-user', JSON.stringify(identity))
  } catch {
    // storage can be unavailable (private mode, sandboxed frame): the name is then per load
  }
}

// Colours arrive from other clients, so only plain hex colours reach a style attribute.
function isColor (value) {
  return typeof value === 'string' && /^#[0-9a-fA-F]{6}$/.test(value)
}

function websocketBase () {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:'
  return `${scheme}//${window.location.host}/doc`
}

function byId (id) {
  const element = document.getElementById(id)
  if (!element) throw new Error(`collab: the page has no #${id}`)
  return element
}

function main () {
  const docName = docNameFromLocation()
  const identity = loadIdentity()

  document.title = `${docName} · collab`
  byId('doc-name').textContent = docName
  const docInput = byId('doc-input')
  docInput.value = docName
  byId('doc-form').addEventListener('submit', (event) => {
    event.preventDefault()
    const next = docInput.value.trim()
    if (next !== '' && next !== docName) window.location.assign(docPath(next))
  })

  const ydoc = new Y.Doc()
  const ytext = ydoc.getText('text')
  // The document name is encoded here because the provider appends it to the URL as is.
  // BroadcastChannel sync is off so that every update goes through the server.
  const provider = new WebsocketProvider(websocketBase(), encodeURIComponent(docName), ydoc, {
    disableBc: true
  })
  const awareness = provider.awareness

  // ---- connection state -------------------------------------------------------------
  let state = provider.wsconnected ? 'connected' : 'connecting'
  let lastClose = null
  let stopped = false

  const statusBox = byId('status')
  const statusText = byId('status-text')
  const closeText = byId('status-close')
  const reconnectButton = byId('reconnect')
  const notice = byId('notice')
  // Whether typing is allowed: not while the server refuses the document.
  const editable = new Compartment()
  const editing = (on) => [
    EditorState.readOnly.of(!on),
    EditorView.editable.of(on),
    on ? placeholder('Start typing — everyone here sees it live.') : []
  ]
  let view = null

  function setStopped (value) {
    stopped = value
    notice.textContent = stopped ? stopMessage(lastClose) : ''
    notice.hidden = !stopped
    if (view) view.dispatch({ effects: editable.reconfigure(editing(!stopped)) })
  }

  function renderStatus () {
    statusBox.dataset.state = state
    let label = { connecting: 'Connecting…', connected: 'Connected', disconnected: 'Disconnected' }[state]
    if (state === 'connected') label += provider.synced ? ' · synced' : ' · syncing…'
    if (stopped) label += ' · not retrying'
    statusText.textContent = label
    if (lastClose) {
      closeText.textContent = `last close: ${lastClose.code}${lastClose.reason ? ' ' + lastClose.reason : ''}`
      closeText.hidden = false
    } else {
      closeText.hidden = true
    }
    reconnectButton.hidden = !stopped
  }

  provider.on('status', ({ status }) => {
    state = status
    if (status !== 'disconnected' && stopped) setStopped(false)
    renderStatus()
  })
  provider.on('connection-close', (event) => {
    // `event` is null when the provider closed the socket itself (e.g. a silent server)
    if (event) lastClose = { code: event.code, reason: event.reason }
    state = 'disconnected'
    renderStatus()
  })
  provider.on('closed', () => {
    // a 44xx close: the provider will not retry until told to
    setStopped(true)
    renderStatus()
  })
  provider.on('sync', renderStatus)
  reconnectButton.addEventListener('click', () => {
    setStopped(false)
    provider.connect()
    renderStatus()
  })
  renderStatus()

  // ---- presence ---------------------------------------------------------------------
  function publishUser () {
    awareness.setLocalStateField('user', {
      name: identity.name,
      color: identity.color,
      colorLight: identity.color + '33'
    })
  }
  publishUser()

  const nameInput = byId('user-name')
  const swatch = byId('user-color')
  nameInput.value = identity.name
  swatch.style.backgroundColor = identity.color
  function setUserName (name) {
    const trimmed = String(name).trim().slice(0, 40)
    if (trimmed === '' || trimmed === identity.name) return
    identity.name = trimmed
    nameInput.value = trimmed
    saveIdentity(identity)
    publishUser()
  }
  nameInput.addEventListener('change', () => {
    setUserName(nameInput.value)
    nameInput.value = identity.name
  })
  nameInput.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') nameInput.blur()
  })

  function otherUsers () {
    const users = []
    awareness.getStates().forEach((value, clientId) => {
      if (clientId === ydoc.clientID) return
      const user = value && value.user
      if (user && typeof user.name === 'string') {
        users.push({ name: user.name, color: isColor(user.color) ? user.color : '#868e96' })
      }
    })
    users.sort((a, b) => a.name.localeCompare(b.name))
    return users
  }

  const peerList = byId('peer-list')
  const peerEmpty = byId('peer-empty')
  function renderPeers () {
    const users = otherUsers()
    peerList.replaceChildren(...users.map((user) => {
      const item = document.createElement('li')
      const dot = document.createElement('span')
      dot.className = 'dot'
      dot.style.backgroundColor = user.color
      item.append(dot, document.createTextNode(user.name))
      return item
    }))
    peerList.hidden = users.length === 0
    peerEmpty.hidden = users.length > 0
  }
  awareness.on('change', renderPeers)
  renderPeers()

  // ---- editor -----------------------------------------------------------------------
  const undoManager = new Y.UndoManager(ytext)
  view = new EditorView({
    parent: byId('editor'),
    state: EditorState.create({
      doc: ytext.toString(),
      extensions: [
        lineNumbers(),
        highlightActiveLineGutter(),
        highlightSpecialChars(),
        drawSelection(),
        highlightActiveLine(),
        EditorView.lineWrapping,
        keymap.of([...yUndoManagerKeymap, ...defaultKeymap]),
        yCollab(ytext, awareness, { undoManager }),
        editable.of(editing(!stopped))
      ]
    })
  })

  // Leave at once on tab close so the others see us go without waiting for a timeout.
  window.addEventListener('pagehide', () => awareness.setLocalState(null))
  window.addEventListener('pageshow', (event) => {
    if (event.persisted) publishUser()
  })

  // ---- hooks for tests and the console ----------------------------------------------
  window.collab = {
    ydoc,
    provider,
    view,
    docName,
    text: () => ytext.toString(),
    insert: (index, str) => ydoc.transact(() => ytext.insert(index, str)),
    remove: (index, length) => ydoc.transact(() => ytext.delete(index, length)),
    state: () => state,
    lastClose: () => (lastClose ? { ...lastClose } : null),
    stopped: () => stopped,
    notice: () => (notice.hidden ? null : notice.textContent),
    editable: () => !view.state.readOnly,
    synced: () => provider.synced,
    peers: () => otherUsers().map((user) => user.name),
    userName: () => identity.name,
    setUserName
  }
}

main()
