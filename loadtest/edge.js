// k6 load test of the edge's rate limits: KEYS credentials, each sending at twice its
// rate limit. Expected: over-limit requests get 429 with Retry-After and RateLimit-*
// headers, no request gets a 5xx, and accepted requests stay fast (p99 < 50 ms).
//
// Run through loadtest/run-edge (it makes the keys, starts the edge, and runs k6):
//   loadtest/run-edge
// or against an edge you started, with its keys:
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e API_KEYS=fg_…,fg_… -e RATE_PER_SEC=200 loadtest/edge.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import exec from 'k6/execution';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
if (!/^http:\/\/(127\.|localhost)/.test(BASE_URL)) {
  throw new Error('load tests only ever target loopback');
}
const KEYS = (__ENV.API_KEYS || '').split(',').filter((k) => k.length > 0);
if (KEYS.length === 0) {
  throw new Error('set API_KEYS to a comma-separated list of API key secrets');
}
// Each key's limit, in events per second; requests carry BATCH events each.
const RATE_PER_SEC = parseInt(__ENV.RATE_PER_SEC || '200', 10);
const BATCH = parseInt(__ENV.BATCH || '10', 10);
const DURATION = __ENV.DURATION || '30s';
// Twice the limit, in requests per second per key.
const REQUESTS_PER_SEC = Math.ceil((2 * RATE_PER_SEC) / BATCH);

const accepted = new Counter('floodgate_accepted_requests');
const limited = new Counter('floodgate_rate_limited_requests');

const scenarios = {};
KEYS.forEach((_, i) => {
  scenarios[`key${i}`] = {
    executor: 'constant-arrival-rate',
    rate: REQUESTS_PER_SEC,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: 10,
    maxVUs: 50,
    env: { KEY_INDEX: `${i}` },
    tags: { key: `key${i}` },
  };
});

export const options = {
  scenarios,
  thresholds: {
    // Accepted requests are fast…
    'http_req_duration{status:200}': ['p(99)<50'],
    // …no server errors at all…
    'http_reqs{status_class:5xx}': ['count==0'],
    // …every answer is as documented…
    checks: ['rate==1'],
    // …and the limits do bite at twice the rate.
    floodgate_rate_limited_requests: ['count>0'],
  },
  summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'max'],
};

http.setResponseCallback(http.expectedStatuses(200, 429));

// One body per key, built once; each request substitutes a unique suffix, so k6 spends
// its CPU on sending rather than on building JSON (it shares the machine with the edge).
const now = new Date().toISOString();
const TEMPLATES = KEYS.map((_, keyIndex) => {
  const events = [];
  for (let n = 0; n < BATCH; n++) {
    events.push({
      specversion: '1.0',
      id: `k6-${keyIndex}-@U@-${n}`,
      source: `/k6/key${keyIndex}`,
      type: 'booking.requested',
      time: now,
      data: {
        bookingId: `k6_${keyIndex}_@U@_${n}`,
        eventId: `K6-${keyIndex}-${n % 5}`,
        customerId: `c${keyIndex}`,
        seats: 1 + (n % 4),
        requestedAt: now,
      },
    });
  }
  return JSON.stringify(events).split('@U@');
});

function batch(keyIndex) {
  return TEMPLATES[keyIndex].join(`${exec.vu.idInTest}_${exec.scenario.iterationInTest}`);
}

export default function () {
  const keyIndex = parseInt(__ENV.KEY_INDEX, 10);
  const res = http.post(`${BASE_URL}/v1/events`, batch(keyIndex), {
    headers: {
      'Content-Type': 'application/cloudevents-batch+json',
      'X-Api-Key': KEYS[keyIndex],
    },
    tags: { name: 'POST /v1/events' },
  });
  res.headers['Content-Type'] = res.headers['Content-Type'] || '';
  if (res.status === 200) {
    accepted.add(1);
  } else if (res.status === 429) {
    limited.add(1);
  }
  check(res, {
    'status is 200 or 429': (r) => r.status === 200 || r.status === 429,
    '429 carries Retry-After': (r) => r.status !== 429 || parseInt(r.headers['Retry-After'], 10) >= 1,
    '429 carries RateLimit headers': (r) =>
      r.status !== 429 ||
      (r.headers['Ratelimit-Limit'] !== undefined && r.headers['Ratelimit-Remaining'] === '0'),
    'answers are JSON': (r) => r.headers['Content-Type'].startsWith('application/json'),
  });
}
