// Drives the official AnyCable JS client (@anycable/core with `ws`) as a chat user, for the
// Python test suite: subscribes to ChatChannel {room} and reports what it sees as JSON lines.
//
//   node tests/js/chat_client.mjs --url <ws url> --room <room> [--cookie <Cookie header>]
//        [--timeout SECONDS] [--protocol actioncable-v1-ext-json]
//
// Prints {"event":"connected"}, {"event":"subscribed"}, {"event":"message","data":...},
// {"event":"error","error":"..."} (rejected subscription, closed cable, timeout) and
// {"event":"close","reason":...}. Reads commands from stdin, one JSON object per line:
//   {"cmd":"speak","text":"hi","to_others":false}   channel.perform('speak', {text, to_others})
//   {"cmd":"exit"}                                   disconnect and exit 0
// Exits 2 after --timeout seconds (default 20).

import { writeSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { createCable } from '@anycable/core'
import WebSocket from 'ws'

function emit(obj) {
  writeSync(1, JSON.stringify(obj) + '\n')
}

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string' },
    room: { type: 'string' },
    cookie: { type: 'string' },
    timeout: { type: 'string', default: '20' },
    protocol: { type: 'string', default: 'actioncable-v1-ext-json' }
  },
  strict: true
})
if (!opts.url || !opts.room) {
  process.stderr.write('usage: chat_client.mjs --url <ws url> --room <room> [--cookie C] [--timeout S] [--protocol P]\n')
  process.exit(64)
}

// In Node, `ws` takes request headers; a browser would send the page's cookies itself.
const websocketOptions = opts.cookie ? { headers: { cookie: opts.cookie } } : {}
const cable = createCable(opts.url, { protocol: opts.protocol, websocketImplementation: WebSocket, websocketOptions })

let finished = false
function finish(code) {
  if (finished) return
  finished = true
  cable.disconnect()
  setTimeout(() => process.exit(code), 50)
}

cable.on('connect', ({ reconnect, restored }) => emit({ event: 'connected', reconnect, restored }))
cable.on('close', err => {
  if (finished) return
  emit({ event: 'close', reason: err ? err.reason ?? null : null })
  emit({ event: 'error', error: `cable closed: ${err ? err.reason ?? err.message : 'by client'}` })
  finish(1)
})

const channel = cable.subscribeTo('ChatChannel', { room: opts.room })
channel.on('connect', () => emit({ event: 'subscribed' }))
channel.on('message', data => emit({ event: 'message', data }))
channel.on('close', err => {
  if (finished) return
  emit({ event: 'error', error: err ? `${err.name}: ${err.message}` : 'closed' })
  finish(1)
})

setTimeout(() => {
  emit({ event: 'error', error: `timeout after ${opts.timeout}s` })
  finish(2)
}, Number(opts.timeout) * 1000)

createInterface({ input: process.stdin }).on('line', line => {
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch {
    emit({ event: 'error', error: `bad control line: ${line}` })
    return
  }
  if (cmd.cmd === 'speak') {
    channel.perform('speak', { text: cmd.text, to_others: Boolean(cmd.to_others) }).catch(err =>
      emit({ event: 'error', error: `perform failed: ${err.message}` })
    )
  } else if (cmd.cmd === 'exit') {
    finish(0)
  } else {
    emit({ event: 'error', error: `unknown control command: ${line}` })
  }
})
