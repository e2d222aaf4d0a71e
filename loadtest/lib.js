// What the k6 scenarios share: the edge's address (loopback only), credentials, request
// bodies with fresh ids built from a template, putting events on sale, and reading the
// bookings state back. Run the scenarios through loadtest/run.
import http from 'k6/http';
import { sleep } from 'k6';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
if (!/^http:\/\/(127\.|localhost[:/]|localhost$)/.test(BASE_URL)) {
  throw new Error('load tests only ever target loopback');
}

// The seed's SLO, overridable (a threshold that cannot hold shows that a failing one
// fails the run): p99 of POST /v1/events in ms, and the largest share of failed requests.
export const P99_MS = parseFloat(__ENV.P99_MS || '200');
export const MAX_ERROR_RATE = parseFloat(__ENV.MAX_ERROR_RATE || '0.001');

// Tags every POST /v1/events, so that thresholds leave setup and teardown requests out.
export const POST_EVENTS = 'POST /v1/events';

// A run's ids hold this, so that a run against a long-lived edge is never deduplicated.
// Made once, in setup, and handed to every VU as setup's data: init code runs once per VU,
// each at its own time.
export function newRunId() {
  return __ENV.RUN_ID || Date.now().toString(36);
}

export function headers(contentType) {
  const h = { 'Content-Type': contentType || 'application/cloudevents-batch+json' };
  if (__ENV.API_KEY) {
    h['X-Api-Key'] = __ENV.API_KEY;
  }
  return h;
}

const NOW = new Date().toISOString();

function bookingEvent(id, bookingId, eventId, customerId, seats) {
  return {
    specversion: '1.0',
    id,
    source: '/k6/bookings',
    type: 'booking.requested',
    time: NOW,
    datacontenttype: 'application/json',
    data: { bookingId, eventId, customerId, seats, requestedAt: NOW },
  };
}

// A batch of `n` bookings of one seat each, spread over `eventIds`, built once and split
// where the unique part goes: a request costs k6 a string join, not a JSON encoding (k6
// shares the machine with the edge).
export function bookingTemplate(prefix, n, eventIds) {
  const events = [];
  for (let i = 0; i < n; i++) {
    events.push(
      bookingEvent(`${prefix}-@U@-${i}`, `${prefix}-@U@-${i}`, eventIds[i % eventIds.length], `c${i % 997}`, 1),
    );
  }
  return JSON.stringify(events).split('@U@');
}

export function fill(template, unique) {
  return template.join(unique);
}

// One booking, as one client sends it.
export function oneBooking(bookingId, eventId, customerId, seats) {
  return JSON.stringify([bookingEvent(`ev-${bookingId}`, bookingId, eventId, customerId, seats)]);
}

// Every event of a batch answer accepted (200, or 207 with every result accepted).
export function everyEventAccepted(res, n) {
  if (res.status !== 200) {
    return false;
  }
  try {
    const body = res.json();
    return body.accepted === n && body.results.every((r) => r.status === 'accepted');
  } catch (e) {
    return false;
  }
}

// Puts `eventIds` on sale with `capacity` seats each and waits until the processors have
// applied them (GET /v1/inventory/{id} answers), for at most `timeoutSecs`.
export function putOnSale(eventIds, capacity, timeoutSecs) {
  const events = eventIds.map((eventId, i) => ({
    specversion: '1.0',
    id: `inv-${eventId}-${i}`,
    source: '/k6/inventory',
    type: 'inventory.event.created',
    time: NOW,
    datacontenttype: 'application/json',
    data: { eventId, name: `k6 ${eventId}`, venue: 'Loopback Arena', startsAt: '2027-06-01T19:30:00Z', capacity },
  }));
  const res = http.post(`${BASE_URL}/v1/events`, JSON.stringify(events), {
    headers: headers(),
    tags: { name: 'setup' },
  });
  if (res.status !== 200) {
    throw new Error(`putting events on sale: ${res.status} ${res.body}`);
  }
  const deadline = Date.now() + timeoutSecs * 1000;
  for (const eventId of eventIds) {
    for (;;) {
      const inv = inventory(eventId);
      if (inv) {
        break;
      }
      if (Date.now() > deadline) {
        throw new Error(`event ${eventId} was not on sale within ${timeoutSecs} s`);
      }
      sleep(0.1);
    }
  }
}

// Reads of the bookings state: 404 (not applied yet) is an expected answer there.
const STATE = { headers: headers(), tags: { name: 'state' }, responseCallback: http.expectedStatuses(200, 404) };

// The inventory of `eventId` ({eventId, capacity, reserved, remaining}), or null.
export function inventory(eventId) {
  const res = http.get(`${BASE_URL}/v1/inventory/${eventId}`, STATE);
  return res.status === 200 ? res.json() : null;
}

// The bookings among `bookingIds` that the processors have decided, by id
// ({status, seats, …}); the rest are not there yet (404).
export function bookings(bookingIds) {
  const found = {};
  const chunk = 50;
  for (let i = 0; i < bookingIds.length; i += chunk) {
    const ids = bookingIds.slice(i, i + chunk);
    const answers = http.batch(
      ids.map((id) => ['GET', `${BASE_URL}/v1/bookings/${id}`, null, STATE]),
    );
    answers.forEach((res, j) => {
      if (res.status === 200) {
        found[ids[j]] = res.json();
      }
    });
  }
  return found;
}
