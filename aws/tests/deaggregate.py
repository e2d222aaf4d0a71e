"""Deaggregates Kinesis records with the independent `aws_kinesis_agg` library (pinned in
scripts/requirements-test.txt), for aws/tests/kinesis.rs.

Reads JSON lines on stdin, one raw Kinesis record each: {"shard", "sequenceNumber",
"partitionKey", "data": hex}. Writes JSON lines on stdout, one user record each:
{"shard", "sequenceNumber", "subSequenceNumber" (null when the record was not
aggregated), "partitionKey", "data": hex}.
"""

import base64
import json
import sys

from aws_kinesis_agg.deaggregator import iter_deaggregate_records


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        raw = json.loads(line)
        # The Lambda event shape, which the library reads by default.
        record = {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "sequenceNumber": raw["sequenceNumber"],
                "partitionKey": raw["partitionKey"],
                "approximateArrivalTimestamp": 0,
                "data": base64.b64encode(bytes.fromhex(raw["data"])).decode(),
            }
        }
        for user in iter_deaggregate_records(record):
            k = user["kinesis"]
            print(
                json.dumps(
                    {
                        "shard": raw["shard"],
                        "sequenceNumber": k["sequenceNumber"],
                        "subSequenceNumber": k.get("subSequenceNumber"),
                        "partitionKey": k["partitionKey"],
                        "data": base64.b64decode(k["data"]).hex(),
                    }
                )
            )


if __name__ == "__main__":
    main()
