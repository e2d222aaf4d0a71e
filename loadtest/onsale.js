// k6: an on-sale spike. Setup puts one event on sale with CAPACITY seats (100); then VUS
// clients (200) send BOOKINGS single bookings (1000) of 1 to MAX_SEATS seats (2) as fast
// as they are answered, far more seats than there are. Teardown waits (up to
// DECIDE_TIMEOUT s, 60) until the processors have decided every booking, then reads
// GET /v1/inventory/{eventId} and every booking back.
//
// Thresholds (each fails the run, k6 exits 99): the event is never oversold (reserved ≤
// capacity); the seats of the confirmed bookings equal `reserved`; every booking was
// decided; POST /v1/events p(99) < P99_MS (200); at most MAX_ERROR_RATE (0.001) of the
// posts failed and at least 1 − MAX_ERROR_RATE of them had their event accepted.
//
//   loadtest/run onsale                      # CAPACITY=100 BOOKINGS=1000 VUS=200
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Rate } from 'k6/metrics';
import {
  BASE_URL, MAX_ERROR_RATE, P99_MS, POST_EVENTS, bookings, everyEventAccepted, headers, inventory, newRunId, oneBooking,
  putOnSale,
} from './lib.js';

const CAPACITY = parseInt(__ENV.CAPACITY || '100', 10);
const BOOKINGS = parseInt(__ENV.BOOKINGS || '1000', 10);
const VUS = parseInt(__ENV.VUS || '200', 10);
const MAX_SEATS = parseInt(__ENV.MAX_SEATS || '2', 10);
const DECIDE_TIMEOUT = parseFloat(__ENV.DECIDE_TIMEOUT || '60');
const POST = { headers: headers(), tags: { name: POST_EVENTS } };

const neverOversold = new Rate('onsale_never_oversold');
const confirmedEqualReserved = new Rate('onsale_confirmed_seats_equal_reserved');
const everyBookingDecided = new Rate('onsale_every_booking_decided');

export const options = {
  scenarios: {
    onsale: {
      executor: 'shared-iterations',
      vus: VUS,
      iterations: BOOKINGS,
      maxDuration: __ENV.MAX_DURATION || '120s',
    },
  },
  thresholds: {
    onsale_never_oversold: ['rate==1'],
    onsale_confirmed_seats_equal_reserved: ['rate==1'],
    onsale_every_booking_decided: ['rate==1'],
    [`http_req_duration{name:${POST_EVENTS}}`]: [`p(99)<${P99_MS}`],
    [`http_req_failed{name:${POST_EVENTS}}`]: [`rate<${MAX_ERROR_RATE}`],
    'checks{check:booking accepted}': [`rate>=${1 - MAX_ERROR_RATE}`],
  },
  setupTimeout: '120s',
  teardownTimeout: `${Math.ceil(DECIDE_TIMEOUT) + 60}s`,
  summaryTrendStats: ['min', 'med', 'p(90)', 'p(99)', 'max'],
};

function seats(i) {
  return 1 + (i % MAX_SEATS);
}

function bookingId(eventId, i) {
  return `${eventId}-b${i}`;
}

export function setup() {
  const eventId = `onsale-${newRunId()}`;
  putOnSale([eventId], CAPACITY, 60);
  console.log(`onsale: ${eventId}, ${CAPACITY} seats; ${BOOKINGS} bookings from ${VUS} clients against ${BASE_URL}`);
  return { eventId };
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const body = oneBooking(bookingId(data.eventId, i), data.eventId, `fan${exec.vu.idInTest}`, seats(i));
  const res = http.post(`${BASE_URL}/v1/events`, body, POST);
  check(res, { 'booking accepted': (r) => everyEventAccepted(r, 1) });
}

export function teardown(data) {
  const ids = [...Array(BOOKINGS).keys()].map((i) => bookingId(data.eventId, i));
  const decided = {};
  let pending = ids;
  const deadline = Date.now() + DECIDE_TIMEOUT * 1000;
  for (;;) {
    Object.assign(decided, bookings(pending));
    pending = pending.filter((id) => !(id in decided));
    if (pending.length === 0 || Date.now() > deadline) {
      break;
    }
    sleep(0.5);
  }
  const inv = inventory(data.eventId);
  const all = Object.values(decided);
  const confirmed = all.filter((b) => b.status === 'confirmed');
  const confirmedSeats = confirmed.reduce((n, b) => n + b.seats, 0);
  const rejected = all.filter((b) => b.status === 'rejected').length;
  console.log(
    `onsale: ${ids.length} bookings: ${confirmed.length} confirmed (${confirmedSeats} seats), ${rejected} rejected, ` +
      `${pending.length} undecided; inventory ${inv ? `reserved ${inv.reserved} of ${inv.capacity}` : 'missing'}`,
  );
  neverOversold.add(inv !== null && inv.reserved <= inv.capacity && inv.capacity === CAPACITY);
  confirmedEqualReserved.add(inv !== null && confirmedSeats === inv.reserved);
  everyBookingDecided.add(pending.length === 0);
}
