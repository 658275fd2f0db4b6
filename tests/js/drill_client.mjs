// Many official AnyCable JS clients (@anycable/core with `ws`) in one process, for drills:
// workers killed, rolled, nodes switched, Redis restarted, while a stream of numbered
// messages flows. Each client records every message it gets; the test checks that each
// got every number exactly once, in order.
//
//   node tests/js/drill_client.mjs --url <ws url>[,<ws url>...] --clients N
//        (--stream <prefix> | --channel <Channel> --params <json>) [--streams K]
//        [--reconnect-delay MS] [--token-param NAME]
//
// Client i connects to url[i % urls] and subscribes to `<prefix>/<i % K>` (with --stream),
// or to the channel with params plus {"room": "<i % K>"} (with --channel); with
// --token-param it adds ?<NAME>=tok-c<i> to its URL (an RPC backend identifies it).
// Prints {"event":"ready","clients":N} once every client is subscribed. Reads commands
// from stdin, one JSON object per line:
//   {"cmd":"report"}  prints {"event":"report","clients":[{"i":…,"stream":…,"got":[n…],
//                     "metas":[[epoch,offset]…],"connects":…,"restores":…,"history":[…]}]}
//   {"cmd":"drop","fraction":0.5}  terminate the sockets of that share of the clients
//   {"cmd":"exit"}    disconnect every cable and exit 0
// Messages whose data is an object with a number `n` are recorded; others are ignored.

import { writeSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { createCable } from '@anycable/core'
import WebSocket from 'ws'

function emit(obj) {
  try {
    writeSync(1, JSON.stringify(obj) + '\n')
  } catch (err) {
    if (err.code === 'EPIPE') process.exit(1)
    throw err
  }
}

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string' },
    clients: { type: 'string', default: '10' },
    stream: { type: 'string' },
    channel: { type: 'string' },
    params: { type: 'string', default: '{}' },
    streams: { type: 'string', default: '1' },
    'reconnect-delay': { type: 'string', default: '200' },
    'token-param': { type: 'string' }
  },
  strict: true
})

const urls = opts.url.split(',')
const n = Number(opts.clients)
const k = Number(opts.streams)
const delay = Number(opts['reconnect-delay'])
const clients = []
let ready = 0

for (let i = 0; i < n; i++) {
  let url = urls[i % urls.length]
  if (opts['token-param']) url += (url.includes('?') ? '&' : '?') + `${opts['token-param']}=tok-c${i}`
  const state = { i, stream: null, got: [], metas: [], connects: 0, restores: 0, history: [], disconnects: [] }
  const cable = createCable(url, {
    protocol: 'actioncable-v1-ext-json',
    websocketImplementation: WebSocket,
    websocketOptions: { allowSynchronousEvents: false },
    reconnectStrategy: () => delay + Math.floor(Math.random() * delay)
  })
  cable.on('connect', ({ restored }) => {
    state.connects += 1
    if (restored) state.restores += 1
  })
  // why the connection ended, as the client saw it: the server's reason (server_restart),
  // or 'closed' for a close without a disconnect message
  cable.on('disconnect', ev => state.disconnects.push(ev && ev.reason ? String(ev.reason) : 'closed'))
  let channel
  if (opts.stream !== undefined) {
    state.stream = `${opts.stream}/${i % k}`
    channel = cable.streamFrom(state.stream)
  } else {
    const params = { ...JSON.parse(opts.params), room: String(i % k) }
    state.stream = params.room
    channel = cable.subscribeTo(opts.channel, params)
  }
  let counted = false
  channel.on('connect', () => {
    if (!counted) {
      counted = true
      ready += 1
      if (ready === n) emit({ event: 'ready', clients: n })
    }
  })
  channel.on('info', info => state.history.push(info.type))
  channel.on('message', (data, meta) => {
    if (data && typeof data === 'object' && typeof data.n === 'number') {
      state.got.push(data.n)
      state.metas.push(meta ? [meta.epoch, meta.offset] : null)
    }
  })
  clients.push({ cable, state })
}

createInterface({ input: process.stdin }).on('line', line => {
  const cmd = JSON.parse(line)
  if (cmd.cmd === 'report') {
    emit({ event: 'report', clients: clients.map(c => c.state) })
  } else if (cmd.cmd === 'drop') {
    const m = Math.round(clients.length * (cmd.fraction ?? 1))
    for (const c of clients.slice(0, m)) {
      const ws = c.cable.transport.ws
      if (ws) ws.terminate()
    }
    emit({ event: 'dropped', clients: m })
  } else if (cmd.cmd === 'exit') {
    for (const c of clients) c.cable.disconnect()
    setTimeout(() => process.exit(0), 100)
  }
})
