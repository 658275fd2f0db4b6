// An AnyCable RPC backend built on @anycable/serverless-js, for the Python test suite.
//
//   node tests/js/rpc_server.mjs [--port N] [--mount /_anycable] [--broadcast-url URL]
//        [--broadcast-key KEY] [--rpc-secret SECRET]
//
// Serves AnyCable RPC over HTTP (POST <mount>/connect, /command, /disconnect) with the
// library's own handlers, and a small read-only test API:
//   GET /_test/calls    every RPC request received: {method, sid, protov, authorization, body}
//   GET /_test/events   what the application callbacks saw (connect, unsubscribed, disconnect, ...)
// Prints {"event":"listening","port":N} on stdout once it accepts connections (--port 0 =
// any free port). With --rpc-secret, requests without `Authorization: Bearer <secret>` get 401.
//
// The application:
//   connect     identified by cookie `username=<name>`, header `x-api-token: tok-<name>` or
//               URL param `?token=tok-<name>`; anything else is rejected. Sets connection
//               state `via` (how it was identified). User "ghost" is accepted without identifiers.
//   ChatChannel {room}: room "forbidden" rejects; otherwise streams from chat_<room>, transmits
//               {"hello": <user>} from `subscribed` and keeps channel state {room, count}.
//               Actions: speak {text} (broadcast {user, text} to chat_<room> through the
//               server's /_broadcast and transmit {"echo": text}), follow/unfollow {stream},
//               stop_all, tick {by} (count += by, transmit {count, user}), remember {city}
//               (connection state `city`), whoami (transmit identifiers and both states),
//               kick (disconnect: true), boom (throws: status ERROR).
//               `unsubscribed` broadcasts {"left": <user>} to chat_<room> and records the
//               channel state it saw.

import { createServer } from 'node:http'
import { register } from 'node:module'
import { parseArgs } from 'node:util'

// serverless-js 0.1.0 needs a resolution hook to load as ES modules (see rpc_hooks.mjs);
// it must be registered before the package is imported, hence the dynamic import.
register('./rpc_hooks.mjs', import.meta.url)
const { Application, Channel, Status, broadcaster, commandHandler, connectHandler, disconnectHandler } =
  await import('@anycable/serverless-js')

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    mount: { type: 'string', default: '/_anycable' },
    'broadcast-url': { type: 'string', default: '' },
    'broadcast-key': { type: 'string', default: '' },
    'rpc-secret': { type: 'string', default: '' },
  },
})

const calls = []
const events = []
const record = (event) => events.push({ ...event, at: Date.now() })

const broadcastTo = opts['broadcast-url'] ? broadcaster(opts['broadcast-url'], opts['broadcast-key']) : null

async function broadcast(stream, data) {
  if (!broadcastTo) throw new Error('no --broadcast-url given')
  await broadcastTo(stream, data)
}

function identify(env) {
  const params = new URL(env.url).searchParams
  const headers = env.headers || {}
  const cookie = (headers.cookie || '').split(';').map((p) => p.trim())
  const named = cookie.find((p) => p.startsWith('username='))
  if (named) return { user: decodeURIComponent(named.slice('username='.length)), via: 'cookie' }
  const token = headers['x-api-token']
  if (token && token.startsWith('tok-')) return { user: token.slice(4), via: 'header' }
  const param = params.get('token')
  if (param && param.startsWith('tok-')) return { user: param.slice(4), via: 'param' }
  return null
}

class CableApplication extends Application {
  async connect(handle) {
    const found = identify(handle.env)
    record({ event: 'connect', sid: handle.id, url: handle.env.url, headers: handle.env.headers, found })
    if (!found) {
      handle.reject()
      return
    }
    if (found.user !== 'ghost') handle.identifiedBy({ user: found.user })
    handle.env.cstate = { ...(handle.env.cstate || {}), via: found.via }
  }

  async disconnect(handle) {
    record({
      event: 'disconnect',
      sid: handle.id,
      identifiers: handle.identifiers,
      cstate: handle.env.cstate || null,
      url: handle.env.url,
    })
  }
}

// On Disconnect, AnyCable sends env.istate as {identifier: JSON(channel state map)}; the
// channel state map of a serverless-js channel is itself {identifier: JSON(state)} (that is
// how serverless-js stores it on Command), so `unsubscribed` gets the state wrapped once more.
function channelState(handle) {
  const state = handle.state
  if (state && typeof state[handle.identifier] === 'string') return JSON.parse(state[handle.identifier])
  return state
}

class ChatChannel extends Channel {
  async subscribed(handle, params) {
    if (!params || !params.room || params.room === 'forbidden') {
      handle.reject()
      return
    }
    handle.streamFrom(`chat_${params.room}`)
    handle.transmit({ hello: handle.identifiers ? handle.identifiers.user : null })
    handle.state = { room: params.room, count: 0 }
  }

  async unsubscribed(handle, params) {
    const state = channelState(handle)
    const user = handle.identifiers ? handle.identifiers.user : null
    record({ event: 'unsubscribed', sid: handle.delegate.id, identifier: handle.identifier, state, raw: handle.state, user })
    try {
      await broadcast(`chat_${params.room}`, { left: user })
    } catch (e) {
      record({ event: 'broadcast_failed', error: String(e) })
    }
  }

  async speak(handle, params, data) {
    const user = handle.identifiers.user
    await broadcast(`chat_${params.room}`, { user, text: data.text })
    handle.transmit({ echo: data.text })
  }

  async follow(handle, _params, data) {
    handle.streamFrom(data.stream)
  }

  async unfollow(handle, _params, data) {
    handle.stopStreamFrom(data.stream)
  }

  async stop_all(handle) {
    handle.stopAllStreams()
  }

  async tick(handle, _params, data) {
    const state = channelState(handle) || { count: 0 }
    state.count = (state.count || 0) + (data.by || 1)
    handle.state = state
    handle.transmit({ count: state.count, user: handle.identifiers.user })
  }

  async remember(handle, _params, data) {
    handle.env.cstate = { ...(handle.env.cstate || {}), city: data.city }
  }

  async whoami(handle) {
    handle.transmit({ identifiers: handle.identifiers, cstate: handle.env.cstate || null, state: channelState(handle) })
  }

  async kick(handle) {
    handle.delegate.close()
  }

  async boom() {
    throw new Error('boom')
  }
}

const app = new CableApplication()
app.registerChannel('ChatChannel', new ChatChannel())

const handlers = { connect: connectHandler, command: commandHandler, disconnect: disconnectHandler }

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = []
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => resolve(Buffer.concat(chunks)))
    req.on('error', reject)
  })
}

function reply(res, code, obj) {
  const body = JSON.stringify(obj)
  res.writeHead(code, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) })
  res.end(body)
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://backend')
  if (req.method === 'GET' && url.pathname === '/_test/calls') return reply(res, 200, calls)
  if (req.method === 'GET' && url.pathname === '/_test/events') return reply(res, 200, events)
  const method = url.pathname.startsWith(opts.mount + '/') ? url.pathname.slice(opts.mount.length + 1) : ''
  const handler = handlers[method]
  if (req.method !== 'POST' || !handler) return reply(res, 404, { error: 'not found' })

  const body = await readBody(req)
  let parsed = null
  try {
    parsed = JSON.parse(body.toString('utf8'))
  } catch {
    parsed = body.toString('utf8')
  }
  calls.push({
    method,
    sid: req.headers['x-anycable-meta-sid'] || null,
    protov: req.headers['x-anycable-meta-protov'] || null,
    content_type: req.headers['content-type'] || null,
    authorization: req.headers.authorization || null,
    body: parsed,
  })
  if (opts['rpc-secret'] && req.headers.authorization !== `Bearer ${opts['rpc-secret']}`) {
    return reply(res, 401, { error: 'unauthorized' })
  }
  const request = new Request(`http://backend${req.url}`, { method: 'POST', headers: req.headers, body })
  try {
    reply(res, 200, await handler(request, app))
  } catch (e) {
    record({ event: 'error', method, error: String(e) })
    reply(res, 200, { status: Status.ERROR, error_msg: String(e) })
  }
})

server.keepAliveTimeout = 30000
server.listen(Number(opts.port), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ event: 'listening', port: server.address().port }) + '\n')
})

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)))
