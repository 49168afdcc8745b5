"""The WebSocket link: interoperability with wsproto, handshakes, protocol errors,
closing, and concurrency."""
