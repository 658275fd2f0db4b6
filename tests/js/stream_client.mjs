// Drives the official AnyCable JS client (@anycable/core with `ws`) against a server and
// reports what the client sees as JSON lines on stdout, for the Python test suite.
//
//   node tests/js/stream_client.mjs --url <ws url> (--stream <name> | --signed <signed name>)
//        [--count N] [--timeout SECONDS] [--protocol actioncable-v1-ext-json]
//
// Prints one JSON object per line, as things happen:
//   {"event":"connected"}                      the cable got its welcome
//   {"event":"subscribed"}                     the channel is connected
//   {"event":"message","data":...,"meta":...}  one per message (meta: {stream, epoch, offset} or null)
//   {"event":"error","error":"..."}            fatal: rejected subscription, closed cable, timeout
// and exits 0 after N messages (default 1; 0 = never), non-zero on timeout (default 20 s) or error.
// The "connected"/"subscribed" lines also carry the client's {reconnect, restored} flags.
//
// Extra flags, all optional (the contract above stays as it is without them):
//   --frames              also print {"event":"frame","dir":"out"|"in","data":<frame>} for every
//                         WebSocket frame, {"event":"ws_open","url":...,"protocol":...} when a socket
//                         connects, {"event":"ws_close","code":N} when it closes and
//                         {"event":"ws_error","error":...} when it fails (refused, bad handshake)
//   --reconnect-delay MS  fixed reconnect delay instead of the default backoff (3 s and up)
//   --linger SECONDS      after a fatal error keep running (and reporting) this long before exiting
//   --control             read commands from stdin, one JSON object per line:
//                           {"cmd":"drop"}      terminate the socket without a close frame
//                           {"cmd":"offline"}   hold reconnect attempts until "online"
//                           {"cmd":"online"}    let the client reconnect again
//                           {"cmd":"whisper","data":{...}}  channel.whisper(data)
//                           {"cmd":"join","id":"42","info":{...}}  channel.presence.join(id, info)
//                           {"cmd":"leave"}     channel.presence.leave()
//                           {"cmd":"presence"}  channel.presence.info(), reported as
//                                               {"event":"presence_state","state":{id: info, ...}}
//                                               or {"event":"presence_failed","error":"..."}
//                           {"cmd":"exit"}      disconnect the cable and exit 0
//   Also reported: {"event":"disconnect","reason":...} and {"event":"close","reason":...} (cable
//   events), {"event":"info","type":...} (channel info such as history_received) and
//   {"event":"dropped"} after a drop, and {"event":"presence","message":{...}} for every presence
//   frame the channel gets (join, leave, info replies; only when presence is used).

import { writeSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { createCable } from '@anycable/core'
import WebSocket from 'ws'

// One synchronous write per line: the reader is a Python test polling stdout line by line
// while this process runs, and process.exit() must not lose a buffered line.
function emit(obj) {
  try {
    writeSync(1, JSON.stringify(obj) + '\n')
  } catch (err) {
    // Nobody reads us any more: nothing left to report to.
    if (err.code === 'EPIPE') process.exit(1)
    throw err
  }
}

const USAGE =
  'usage: stream_client.mjs --url <ws url> (--stream <name> | --signed <signed name>) ' +
  '[--count N] [--timeout SECONDS] [--protocol P] [--frames] [--reconnect-delay MS] ' +
  '[--linger SECONDS] [--control]'

function parseOptions() {
  let parsed
  try {
    parsed = parseArgs({
      options: {
        url: { type: 'string' },
        stream: { type: 'string' },
        signed: { type: 'string' },
        count: { type: 'string', default: '1' },
        timeout: { type: 'string', default: '20' },
        protocol: { type: 'string', default: 'actioncable-v1-ext-json' },
        frames: { type: 'boolean', default: false },
        'reconnect-delay': { type: 'string' },
        linger: { type: 'string', default: '0' },
        control: { type: 'boolean', default: false }
      },
      strict: true
    }).values
  } catch (err) {
    usage(err.message)
  }
  if (!parsed.url) usage('--url is required')
  if ((parsed.stream === undefined) === (parsed.signed === undefined)) {
    usage('exactly one of --stream and --signed is required')
  }
  let count = Number(parsed.count)
  let timeout = Number(parsed.timeout)
  let linger = Number(parsed.linger)
  let reconnectDelay =
    parsed['reconnect-delay'] === undefined ? undefined : Number(parsed['reconnect-delay'])
  for (let [name, value] of [
    ['--count', count],
    ['--timeout', timeout],
    ['--linger', linger],
    ['--reconnect-delay', reconnectDelay ?? 0]
  ]) {
    if (!Number.isFinite(value) || value < 0) usage(`${name} must be a non-negative number`)
  }
  return { ...parsed, count, timeout, linger, reconnectDelay }
}

function usage(problem) {
  process.stderr.write(`stream_client.mjs: ${problem}\n${USAGE}\n`)
  process.exit(64)
}

function decode(data) {
  let text = data.toString()
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

function describe(err) {
  if (!err) return 'closed'
  let text = err.name ? `${err.name}: ${err.message}` : String(err)
  return err.reason ? `${text} (${err.reason})` : text
}

const opts = parseOptions()

// `ws` with every frame reported. Listeners added here run before the client's `onmessage`,
// so an incoming frame is printed before anything the client does because of it.
class RecordingWebSocket extends WebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, options)
    this.on('open', () => emit({ event: 'ws_open', url, protocol: this.protocol }))
    this.on('message', data => emit({ event: 'frame', dir: 'in', data: decode(data) }))
    this.on('close', code => emit({ event: 'ws_close', code }))
    this.on('error', err => emit({ event: 'ws_error', error: String(err && err.message) }))
  }

  send(data, ...rest) {
    emit({ event: 'frame', dir: 'out', data: decode(data) })
    return super.send(data, ...rest)
  }
}

// "offline": reconnect attempts started by the client's own monitor wait here until "online",
// which models a network that is down for as long as the test needs (no race with its clock).
let online = Promise.resolve()
let goOnline = () => {}

const cable = createCable(opts.url, {
  protocol: opts.protocol,
  websocketImplementation: opts.frames ? RecordingWebSocket : WebSocket,
  // Browser semantics (one frame per task): see FRAMES.md fact 9.
  websocketOptions: { allowSynchronousEvents: false },
  ...(opts.reconnectDelay === undefined ? {} : { reconnectStrategy: () => opts.reconnectDelay }),
  ...(opts.control ? { transportConfigurator: async () => online } : {})
})

let finished = false

function finish(code) {
  if (finished) return
  finished = true
  try {
    cable.disconnect()
  } catch {
    // exiting anyway
  }
  // Let the close frame go out before the process ends.
  setTimeout(() => process.exit(code), 50)
}

function fail(error, code = 1) {
  if (finished) return
  emit({ event: 'error', error })
  if (opts.linger > 0) {
    finished = true
    setTimeout(() => process.exit(code), opts.linger * 1000)
  } else {
    finish(code)
  }
}

cable.on('connect', ({ reconnect, restored }) => emit({ event: 'connected', reconnect, restored }))
cable.on('disconnect', err => emit({ event: 'disconnect', reason: err ? err.reason ?? null : null }))
cable.on('close', err => {
  // Our own cable.disconnect() on the way out is not news.
  if (finished) return
  emit({
    event: 'close',
    reason: err ? err.reason ?? null : null,
    state: cable.state,
    monitor: cable.monitor ? cable.monitor.state : null
  })
  fail(`cable closed: ${err ? err.reason ?? err.message : 'by client'}`)
})

const channel =
  opts.stream !== undefined ? cable.streamFrom(opts.stream) : cable.streamFromSigned(opts.signed)

let received = 0
channel.on('connect', ({ reconnect, restored }) => emit({ event: 'subscribed', reconnect, restored }))
channel.on('info', info => emit({ event: 'info', type: info.type }))
channel.on('close', err => fail(describe(err)))
channel.on('presence', message => emit({ event: 'presence', message }))
channel.on('message', (data, meta) => {
  emit({ event: 'message', data, meta: meta ?? null })
  received += 1
  if (opts.count > 0 && received >= opts.count) finish(0)
})

setTimeout(() => fail(`timeout: ${received} of ${opts.count} messages in ${opts.timeout}s`, 2), opts.timeout * 1000)

if (opts.control) {
  createInterface({ input: process.stdin }).on('line', line => {
    let cmd
    try {
      cmd = JSON.parse(line)
    } catch {
      emit({ event: 'error', error: `bad control line: ${line}` })
      return
    }
    control(cmd)
  })
}

function control(cmd) {
  switch (cmd.cmd) {
    case 'drop': {
      let ws = cable.transport.ws
      if (!ws) {
        emit({ event: 'error', error: 'drop: no socket' })
        return
      }
      // Destroys the TCP socket: no close frame, the server sees the peer vanish (1006).
      ws.terminate()
      emit({ event: 'dropped' })
      return
    }
    case 'offline':
      online = new Promise(resolve => {
        goOnline = resolve
      })
      emit({ event: 'offline' })
      return
    case 'online':
      goOnline()
      online = Promise.resolve()
      emit({ event: 'online' })
      return
    case 'whisper':
      channel.whisper(cmd.data)
      return
    case 'join':
      channel.presence.join(cmd.id, cmd.info)
      return
    case 'leave':
      channel.presence.leave()
      return
    case 'presence':
      channel.presence.info().then(
        state => emit({ event: 'presence_state', state }),
        err => emit({ event: 'presence_failed', error: describe(err) })
      )
      return
    case 'exit':
      finish(0)
      return
    default:
      emit({ event: 'error', error: `unknown control command: ${JSON.stringify(cmd)}` })
  }
}
