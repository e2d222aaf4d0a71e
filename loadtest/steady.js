// k6: steady load at the seed's SLO, or a soak of it. A constant arrival rate of RATE
// requests/s, each a batch of BATCH booking.requested events (one seat each, fresh ids,
// spread over events put on sale in setup with capacity to spare), for DURATION, or for
// SOAK_MINUTES when that is set (the scenario is then called `soak`).
//
// Thresholds (each fails the run, k6 exits 99): POST /v1/events p(99) < P99_MS (200), at
// most MAX_ERROR_RATE (0.001) of them failed (anything but 2xx: a 503 the edge shed is a
// failure), every event of at least 1 − MAX_ERROR_RATE of the answers accepted, and no
// more than MAX_DROPPED requests that k6 could not start on time (by default the same
// share, MAX_ERROR_RATE of the run's requests).
//
// Run through loadtest/run (it starts an edge unless BASE_URL names one):
//   loadtest/run steady                      # RATE=50 BATCH=20 DURATION=60s
//   SOAK_MINUTES=30 loadtest/run soak
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import {
  BASE_URL, MAX_ERROR_RATE, P99_MS, POST_EVENTS, bookingTemplate, everyEventAccepted, fill, headers, newRunId, putOnSale,
} from './lib.js';

const SOAK = (__ENV.SOAK_MINUTES || '') !== '';
const NAME = SOAK ? 'soak' : 'steady';
const RATE = parseInt(__ENV.RATE || '50', 10);
const BATCH = parseInt(__ENV.BATCH || '20', 10);
const SECONDS = SOAK ? Math.round(parseFloat(__ENV.SOAK_MINUTES) * 60) : null;
const DURATION = SOAK ? `${SECONDS}s` : __ENV.DURATION || '60s';
if (!(RATE > 0 && BATCH > 0) || (SOAK && !(SECONDS > 0))) {
  throw new Error('RATE, BATCH and SOAK_MINUTES must be positive');
}

// Enough seats that no booking is refused for want of them: events of the largest capacity
// the schema allows, as many as the run's bookings need (at least 16, for the shards).
const CAPACITY = 1000000;
const seconds = SECONDS || parseFloat(DURATION) * ({ s: 1, m: 60, h: 3600 }[DURATION.slice(-1)] || 1);
// Requests k6 may fail to start on time: by default the errors' share of the run.
const MAX_DROPPED = parseInt(__ENV.MAX_DROPPED || `${Math.floor(RATE * seconds * MAX_ERROR_RATE)}`, 10);
const EVENTS = Math.max(16, Math.ceil((RATE * BATCH * seconds) / CAPACITY) + 1);
const eventIds = (run) => [...Array(EVENTS).keys()].map((i) => `k6-${NAME}-${run}-${i}`);
const POST = { headers: headers(), tags: { name: POST_EVENTS } };

export const options = {
  scenarios: {
    [NAME]: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      // A VU per request in flight: at the SLO's latency a fifth of the rate would do,
      // half gives room for a slow second. k6 adds VUs up to maxVUs when answers slow
      // down (slowly: each runs this script's init), and counts an iteration that found
      // no free VU at its time as dropped (see the threshold).
      preAllocatedVUs: Math.max(20, Math.ceil(RATE / 2)),
      maxVUs: Math.max(100, RATE * 2),
    },
  },
  thresholds: {
    [`http_req_duration{name:${POST_EVENTS}}`]: [`p(99)<${P99_MS}`],
    [`http_req_failed{name:${POST_EVENTS}}`]: [`rate<${MAX_ERROR_RATE}`],
    'checks{check:every event accepted}': [`rate>=${1 - MAX_ERROR_RATE}`],
    // k6 times a request from its actual send: a request it could not send on time is
    // missing from the latencies above, so a run that dropped any did not offer the load
    // it claims.
    dropped_iterations: [`count<=${MAX_DROPPED}`],
  },
  setupTimeout: '120s',
  summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
};

export function setup() {
  const run = newRunId();
  putOnSale(eventIds(run), CAPACITY, 60);
  console.log(`${NAME}: ${RATE} requests/s × ${BATCH} events for ${DURATION} against ${BASE_URL}`);
  return { run };
}

// This VU's body template, made at its first request (it needs setup's run id).
let template = null;

export default function (data) {
  if (template === null) {
    template = bookingTemplate(`k6-${NAME}-${data.run}`, BATCH, eventIds(data.run));
  }
  const res = http.post(`${BASE_URL}/v1/events`, fill(template, `${exec.scenario.iterationInTest}`), POST);
  check(res, { 'every event accepted': (r) => everyEventAccepted(r, BATCH) });
}
