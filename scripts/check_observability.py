"""The Python half of scripts/check-observability (standard library only).

  load URL             post a small, varied load through a running `floodgate serve` and
                       wait until the processors have applied it
  wait PROM QUERY...   wait until Prometheus answers every query with at least one series
  rules PROM           check that every rule evaluates without error, and which alerts fire
  panels PROM FILE     evaluate every panel target of a Grafana dashboard against Prometheus;
                       fail, naming the panel, on a query that errors or returns no series
                       (or only NaN: a quantile of a histogram that observed nothing)

Every wait polls with a deadline.
"""

import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# What the dashboard's variables become for the check: every job and instance, windows that
# cover the whole run.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "job": ".+",
    "instance": ".+",
}
# Rounds of load, a second apart.
ROUNDS = 5
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def fail(message):
    print(f"check-observability: {message}", file=sys.stderr)
    sys.exit(1)


def http(method, url, body=None, headers=None):
    """Returns (status, body bytes); an HTTP error status is an answer, not an exception."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def poll(what, check, seconds):
    """Calls check() until it returns a true value (returned) or the deadline passes."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            fail(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.2)


# ---- load ----------------------------------------------------------------------------

def event(i, ty, data):
    return {"specversion": "1.0", "id": f"obs-{i}", "source": "/check-observability", "type": ty, "data": data}


def booking(i, event_id, seats=1):
    return event(i, "booking.requested", {
        "bookingId": f"obs-b{i}", "eventId": event_id, "customerId": "obs-c",
        "seats": seats, "requestedAt": "2026-11-22T10:00:00Z"})


def load(url):
    def post(events, expect, raw=None, ctype="application/cloudevents-batch+json"):
        body = raw if raw is not None else json.dumps(events).encode()
        status, answer = http("POST", f"{url}/v1/events", body, {"content-type": ctype})
        if status != expect:
            fail(f"POST /v1/events answered {status}, expected {expect}: {answer[:300]!r}")
        return answer

    capacity = 5
    # An event on sale, then more bookings than seats: some confirmed, the rest rejected for
    # capacity (one key, so one shard, applied in order).
    post([event(0, "inventory.event.created", {
        "eventId": "obs-gig", "name": "Observability", "venue": "Hall",
        "startsAt": "2027-01-01T20:00:00Z", "capacity": capacity})], 200)
    post([booking(i, "obs-gig") for i in range(1, 10)], 200)
    # Seats past 64 bits, valid under this run's schemas (seats unbounded): the bookings
    # processor cannot read it and keeps it as a dead letter.
    post(None, 200, raw=json.dumps([booking(999, "obs-dead")]).encode().replace(
        b'"seats": 1', b'"seats": 100000000000000000000'))
    # A repeat of an accepted event: answered as a duplicate; a body that does not parse (400)
    # and an unknown route (404).
    post([booking(1, "obs-gig")], 200)
    post(None, 400, raw=b"[{not json")
    status, _ = http("GET", f"{url}/nowhere")
    if status != 404:
        fail(f"GET /nowhere answered {status}, expected 404")
    # Then rounds a second apart, so that Prometheus (scraping every second) sees counters
    # and histograms move between scrapes: bookings for an event nobody created (rejected:
    # unknown_event) in batches of several sizes, and invalid events (rejected and
    # quarantined), one beside a valid one (207).
    n = 100
    for r in range(ROUNDS):
        if r:
            time.sleep(1)
        for size in (1, 2, 3, 5, 8, 13, 21, 34):
            post([booking(n + k, "obs-nowhere") for k in range(size)], 200)
            n += size
        post([booking(n, "obs-gig", seats=0)], 422)
        post([booking(n + 1, "obs-other"), booking(n + 2, "obs-other", seats=0)], 207)
        n += 3

    def applied():
        status, body = http("GET", f"{url}/v1/inventory/obs-gig")
        return status == 200 and json.loads(body).get("reserved") == capacity

    poll("the bookings of obs-gig to be applied", applied, 60)
    status, body = http("GET", f"{url}/v1/bookings/obs-b9")
    if status != 200 or json.loads(body).get("status") != "rejected":
        fail(f"booking obs-b9 (the ninth for five seats) is not rejected: {status} {body[:200]!r}")

    def metric_present():
        _, body = http("GET", f"{url}/metrics")
        text = body.decode()
        return all(f"\n{m}" in text for m in (
            "floodgate_processor_dead_letters_total", "floodgate_lake_rows_total"))

    poll("a dead letter and lake rows in /metrics", metric_present, 60)
    print("load: posted and applied (5 bookings confirmed, 4 rejected for capacity, 1 dead letter)")


# ---- Prometheus ----------------------------------------------------------------------

def query(prom, expr):
    """Returns (result list, None) or (None, error text)."""
    status, body = http("POST", f"{prom}/api/v1/query",
                        urllib.parse.urlencode({"query": expr}).encode(),
                        {"content-type": "application/x-www-form-urlencoded"})
    try:
        answer = json.loads(body)
    except ValueError:
        return None, f"HTTP {status}: {body[:200]!r}"
    if answer.get("status") != "success":
        return None, f"{answer.get('errorType')}: {answer.get('error')}"
    data = answer["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}], None
    return data["result"], None


def wait(prom, queries):
    for q in queries:
        poll(f"Prometheus to answer {q}", lambda q=q: query(prom, q)[0], 90)
    print(f"prometheus: {len(queries)} readiness queries answered")


def rules(prom):
    def evaluated():
        _, body = http("GET", f"{prom}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        all_rules = [r for g in groups for r in g["rules"]]
        if all_rules and all(r.get("health") != "unknown" for r in all_rules):
            return all_rules
        return None

    all_rules = poll("every alert rule to be evaluated once", evaluated, 30)
    broken = [r for r in all_rules if r.get("health") != "ok"]
    for r in broken:
        print(f"rule {r['name']} ({r.get('labels', {}).get('severity')}): {r.get('lastError')}")
    if broken:
        fail(f"{len(broken)} alert rules do not evaluate in Prometheus")
    firing = sorted({a["labels"]["alertname"] for r in all_rules for a in r.get("alerts", [])})
    print(f"prometheus: {len(all_rules)} alert rules evaluate; active: {', '.join(firing) or 'none'}")
    # The load left one dead letter: the rule must see it in a real Prometheus too; and the
    # server it scrapes is up.
    if "FloodgateDeadLetters" not in firing:
        fail("FloodgateDeadLetters is not active although the load made a dead letter")
    if "FloodgateDown" in firing:
        fail("FloodgateDown is active although the server is up")


# ---- the dashboard -------------------------------------------------------------------

def substitute(expr):
    unknown = []

    def value(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in VARIABLES:
            unknown.append(name)
            return m.group(0)
        return VARIABLES[name]

    return VARIABLE.sub(value, expr), unknown


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


def show(series):
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()))
    v = float(series["value"][1])
    return f"{{{labels}}} {'NaN' if math.isnan(v) else f'{v:.4g}'}"


def panels(prom, path):
    dash = json.load(open(path))
    problems = []
    if dash.get("schemaVersion", 0) < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')} < 36")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append("no `datasource` variable of type datasource")
    for name in ("job", "instance"):
        if name not in variables:
            problems.append(f"no `{name}` variable")
    checked = 0
    for p in walk(dash.get("panels", [])):
        if p.get("type") == "row":
            continue
        title = p.get("title") or f"panel id {p.get('id')}"
        targets = [t for t in p.get("targets", []) if not t.get("hide")]
        if not targets:
            problems.append(f"panel '{title}': no query")
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel '{title}': datasource is not ${{datasource}}")
        for t in targets:
            name = f"panel '{title}' [{t.get('refId')}]"
            expr, unknown = substitute(t.get("expr", ""))
            if unknown:
                problems.append(f"{name}: unknown variables {unknown}")
                continue
            result, error = query(prom, expr)
            checked += 1
            if error:
                problems.append(f"{name}: query failed: {error}\n    {expr}")
            elif not result:
                problems.append(f"{name}: no series\n    {expr}")
            elif all(math.isnan(float(r["value"][1])) for r in result):
                # A quantile over a histogram that observed nothing in the window: the panel
                # would show no data.
                problems.append(f"{name}: only NaN (nothing observed in the window)\n    {expr}")
            else:
                print(f"ok  {name}: {len(result)} series, e.g. {show(result[0])}")
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        fail(f"{len(problems)} of the dashboard's checks failed ({checked} queries run)")
    print(f"dashboard: all {checked} panel queries return series")


def main(argv):
    if len(argv) >= 2 and argv[0] == "load":
        load(argv[1])
    elif len(argv) >= 3 and argv[0] == "wait":
        wait(argv[1], argv[2:])
    elif len(argv) == 2 and argv[0] == "rules":
        rules(argv[1])
    elif len(argv) == 3 and argv[0] == "panels":
        panels(argv[1], argv[2])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
