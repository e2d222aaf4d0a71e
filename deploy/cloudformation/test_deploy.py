#!/usr/bin/env python3
"""Deploys deploy/cloudformation/floodgate.yaml into moto server's CloudFormation and checks
the result through each service's own API, then checks it against floodgate itself.

    test_deploy.py --endpoint http://127.0.0.1:PORT --floodgate target/debug/floodgate

scripts/check-deploy starts the moto server (the pinned one of scripts/requirements-test.txt)
and runs this with that venv's Python (boto3 comes with moto[server]).

moto's CloudFormation skips the resource types it does not implement and still reports the
stack CREATE_COMPLETE (it lists them with no logical id). So no resource is taken on the
stack's word: every resource of the template is listed, and is either

  * created: described through its service's API (DescribeTable, GetBucketEncryption, …)
    and compared with the template and with what the code expects; the properties moto
    does not model are named on the line, never counted as checked; or
  * `SKIPPED by moto: <LogicalId> <Type>`, allowed only for the types in MOTO_SKIPS.

A resource missing whose type is not in MOTO_SKIPS fails the check, and so does a created
resource of a type this file has no verifier for. Then floodgate's configuration is made
from the stack's outputs, and the real binary checks the deployment:
`floodgate aws init --check` (no changes; non-zero on a missing resource or a wrong key
schema) must pass, then fail once the lease table is deleted and once the state table has
the wrong key; `floodgate aws init` must find every resource there (`exists`, never
`created`). The example EventBridge rule is driven with the entry the relay sends.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import boto3
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy/cloudformation/floodgate.yaml"
EXAMPLE_CONFIG = ROOT / "deploy/floodgate.example.toml"
STACK = "floodgate-check"
REGION = "us-east-1"

# Types moto 5.2's CloudFormation does not implement: it creates nothing for them. Each is
# still checked by cfn-lint (schema) and checkov (policy); the Glue tables also by
# gen-glue.py --check. A type that moto starts creating must get a verifier below.
MOTO_SKIPS = {
    "AWS::ApplicationAutoScaling::ScalableTarget",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
    "AWS::Athena::WorkGroup",
    "AWS::CloudWatch::Alarm",
    "AWS::Glue::Database",
    "AWS::Glue::Table",
    "AWS::KinesisFirehose::DeliveryStream",
    "AWS::Logs::LogStream",
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::WAFv2::WebACL",
    "AWS::WAFv2::WebACLAssociation",
}

# What the code expects of its tables (aws/src/leases.rs, aws/src/state.rs `ensure_table`).
EXPECTED_KEYS = {
    "LeaseTable": [("leaseKey", "HASH")],
    "StateTable": [("pk", "HASH"), ("sk", "RANGE")],
}


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


class Deployment:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.kw = dict(
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        self._clients: dict[str, object] = {}
        self.template = yaml.safe_load(TEMPLATE.read_text())
        self.resources = self.template["Resources"]
        self.physical: dict[str, str] = {}
        self.outputs: dict[str, str] = {}

    def client(self, service: str):
        if service not in self._clients:
            self._clients[service] = boto3.client(service, **self.kw)
        return self._clients[service]

    def props(self, logical_id: str) -> dict:
        return self.resources[logical_id].get("Properties", {})

    # ------------------------------------------------------------------ deploy
    def prerequisites(self) -> dict[str, str]:
        """What the stack takes as parameters and an operator makes beforehand."""
        ec2 = self.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(
                VpcId=vpc, CidrBlock=f"10.40.{i}.0/24", AvailabilityZone=f"{REGION}{'ab'[i % 2]}"
            )["Subnet"]["SubnetId"]
            for i in range(4)
        ]
        cert = self.client("acm").request_certificate(DomainName="events.example.com")[
            "CertificateArn"
        ]
        self.client("ssm").put_parameter(
            Name="/floodgate/ingest-auth",
            Type="String",
            Value="[ingest.auth]\napi_keys = []\n",
        )
        return {
            "ContainerImage": "registry.example.com/floodgate:check",
            "VpcId": vpc,
            "PublicSubnetIds": ",".join(subnets[:2]),
            "PrivateSubnetIds": ",".join(subnets[2:]),
            "CertificateArn": cert,
        }

    def deploy(self) -> None:
        params = self.prerequisites()
        self.vpc = params["VpcId"]
        cf = self.client("cloudformation")
        cf.create_stack(
            StackName=STACK,
            TemplateBody=TEMPLATE.read_text(),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
        stack = cf.describe_stacks(StackName=STACK)["Stacks"][0]
        expect(
            stack["StackStatus"] == "CREATE_COMPLETE",
            f"stack status {stack['StackStatus']}: {stack.get('StackStatusReason')}",
        )
        self.outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs") or []}
        missing = set(self.template["Outputs"]) - set(self.outputs)
        expect(not missing, f"outputs missing from the stack: {sorted(missing)}")
        summaries = []
        for page in cf.get_paginator("list_stack_resources").paginate(StackName=STACK):
            summaries += page["StackResourceSummaries"]
        # moto lists the resources it skipped with no logical id.
        self.created = {
            s["LogicalResourceId"]: s for s in summaries if s.get("LogicalResourceId")
        }
        self.physical = {k: s.get("PhysicalResourceId") or "" for k, s in self.created.items()}
        print(
            f"stack {STACK}: {stack['StackStatus']}, {len(self.resources)} resources in the "
            f"template, {len(self.created)} created by moto, "
            f"{len(summaries) - len(self.created)} listed without a logical id (skipped)"
        )

    # ------------------------------------------------------------------ verifiers
    # Each returns (what it checked, what moto does not model) for one created resource.

    def kinesis_stream(self, lid: str, phys: str):
        d = self.client("kinesis").describe_stream_summary(StreamName=phys)[
            "StreamDescriptionSummary"
        ]
        expect(d["StreamStatus"] == "ACTIVE", f"status {d['StreamStatus']}")
        expect(
            d["RetentionPeriodHours"] == 24,
            f"retention {d['RetentionPeriodHours']} h, template default 24",
        )
        return ["ACTIVE", "retention 24 h"], ["StreamModeDetails", "StreamEncryption"]

    def dynamodb_table(self, lid: str, phys: str):
        t = self.client("dynamodb").describe_table(TableName=phys)["Table"]
        keys = [(k["AttributeName"], k["KeyType"]) for k in t["KeySchema"]]
        template_keys = [(k["AttributeName"], k["KeyType"]) for k in self.props(lid)["KeySchema"]]
        expect(keys == template_keys, f"key schema {keys}, template says {template_keys}")
        expect(keys == EXPECTED_KEYS[lid], f"key schema {keys}, the code expects {EXPECTED_KEYS[lid]}")
        attrs = {a["AttributeName"]: a["AttributeType"] for a in t["AttributeDefinitions"]}
        expect(all(attrs.get(k) == "S" for k, _ in keys), f"key attributes {attrs}, want S")
        billing = t.get("BillingModeSummary", {}).get("BillingMode")
        expect(billing == "PAY_PER_REQUEST", f"billing mode {billing}")
        key_text = ", ".join(f"{n} ({k})" for n, k in keys)
        # moto reads the API's SSESpecification.Enabled, not CloudFormation's SSEEnabled.
        return [f"key {key_text}", "PAY_PER_REQUEST"], ["SSESpecification", "PointInTimeRecovery"]

    def s3_bucket(self, lid: str, phys: str):
        s3 = self.client("s3")
        s3.head_bucket(Bucket=phys)
        rules = s3.get_bucket_encryption(Bucket=phys)["ServerSideEncryptionConfiguration"]["Rules"]
        algo = rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"]
        expect(algo == "AES256", f"encryption {algo}")
        return ["exists", f"SSE {algo}"], [
            "PublicAccessBlock",
            "Versioning",
            "Lifecycle",
            "Logging",
            "OwnershipControls",
        ]

    def event_bus(self, lid: str, phys: str):
        name = self.outputs["EventBusName"]
        b = self.client("events").describe_event_bus(Name=name)
        expect(b["Name"] == name, f"bus {b['Name']}")
        return [f"bus {name}"], []

    def event_rule(self, lid: str, phys: str):
        events = self.client("events")
        bus = self.outputs["EventBusName"]
        r = events.describe_rule(Name=phys, EventBusName=bus)
        pattern = json.loads(r["EventPattern"])
        expect(pattern == self.props(lid)["EventPattern"], f"pattern {pattern}")
        expect(r["State"] == "ENABLED", f"state {r['State']}")
        targets = events.list_targets_by_rule(Rule=phys, EventBusName=bus)["Targets"]
        queue_arn = self.queue_arn("BookingConfirmedQueue")
        dlq_arn = self.queue_arn("BookingConfirmedDeadLetterQueue")
        expect([t["Arn"] for t in targets] == [queue_arn], f"targets {targets}")
        expect(
            targets[0].get("DeadLetterConfig", {}).get("Arn") == dlq_arn,
            f"target dead-letter queue {targets[0].get('DeadLetterConfig')}",
        )
        self.drive_rule(bus)
        return [
            f"on bus {bus}",
            "pattern as the template's",
            "target the queue, its DLQ",
            "a relay-shaped booking.confirmed reaches the queue, a booking.rejected does not",
        ], []

    def drive_rule(self, bus: str) -> None:
        """Sends what aws/src/eventbridge.rs sends (Source `floodgate`, DetailType the
        CloudEvents type, Detail the event) and reads the queue."""
        events, sqs = self.client("events"), self.client("sqs")
        url = self.physical["BookingConfirmedQueue"]

        def entry(kind: str, id_: str) -> dict:
            detail = {"specversion": "1.0", "id": id_, "source": "floodgate", "type": kind,
                      "data": {"bookingId": "b1", "eventId": "concert-42"}}
            return {"Source": "floodgate", "DetailType": kind, "Detail": json.dumps(detail),
                    "EventBusName": bus}

        out = events.put_events(
            Entries=[entry("booking.rejected", "r-1"), entry("booking.confirmed", "c-1")]
        )
        expect(out["FailedEntryCount"] == 0, f"put_events failed: {out}")
        got = []
        for _ in range(3):
            msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            got += [json.loads(m["Body"]) for m in msgs.get("Messages", [])]
        kinds = sorted((m["detail-type"], m["detail"]["id"]) for m in got)
        expect(kinds == [("booking.confirmed", "c-1")], f"the queue received {kinds}")

    def queue_arn(self, lid: str) -> str:
        return self.client("sqs").get_queue_attributes(
            QueueUrl=self.physical[lid], AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]

    def sqs_queue(self, lid: str, phys: str):
        a = self.client("sqs").get_queue_attributes(QueueUrl=phys, AttributeNames=["All"])[
            "Attributes"
        ]
        expect(a.get("SqsManagedSseEnabled") == "true", f"SqsManagedSseEnabled {a.get('SqsManagedSseEnabled')}")
        done = ["exists", "SQS-managed SSE"]
        if "RedrivePolicy" in self.props(lid):
            redrive = json.loads(a.get("RedrivePolicy", "{}"))
            dlq = self.queue_arn("BookingConfirmedDeadLetterQueue")
            expect(
                redrive.get("deadLetterTargetArn") == dlq and int(redrive.get("maxReceiveCount", 0)) == 5,
                f"redrive {redrive}",
            )
            done.append("redrive to the DLQ after 5")
        return done, []

    def iam_role(self, lid: str, phys: str):
        iam = self.client("iam")
        role = iam.get_role(RoleName=phys)["Role"]
        trust = policy_document(role["AssumeRolePolicyDocument"])
        want_principal = self.props(lid)["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]
        expect(
            trust["Statement"][0]["Principal"] == want_principal,
            f"trust principal {trust['Statement'][0]['Principal']}",
        )
        names = iam.list_role_policies(RoleName=phys)["PolicyNames"]
        want = {p["PolicyName"]: p["PolicyDocument"] for p in self.props(lid).get("Policies", [])}
        expect(sorted(names) == sorted(want), f"inline policies {names}, template {sorted(want)}")
        actions = 0
        for name, doc in want.items():
            got = policy_document(iam.get_role_policy(RoleName=phys, PolicyName=name)["PolicyDocument"])
            if lid in ("EdgeTaskRole", "WorkerTaskRole"):
                self.only_this_stack(name, got)
            got_actions = [sorted(as_list(s["Action"])) for s in got["Statement"]]
            want_actions = [sorted(as_list(s["Action"])) for s in doc["Statement"]]
            expect(got_actions == want_actions, f"{name}: actions {got_actions}")
            actions += sum(len(a) for a in got_actions)
        principal = next(iter(want_principal.values()))
        done = [f"trusts {principal}", f"{len(names)} inline polic{'y' if len(names) == 1 else 'ies'}, {actions} actions as the template's"]
        if lid in ("EdgeTaskRole", "WorkerTaskRole"):
            done.append("every resource this stack's")
        # moto's CloudFormation attaches no ManagedPolicyArns (and holds no AWS-managed policy).
        return done, ["ManagedPolicyArns"] if "ManagedPolicyArns" in self.props(lid) else []

    def only_this_stack(self, name: str, doc: dict) -> None:
        """A task role's every statement names resources of this stack, never `*`."""
        names = [self.physical[k] for k in ("Stream", "QuarantineStream", "LeaseTable", "StateTable", "LakeBucket")]
        names += [self.outputs["EventBusName"], self.outputs["DeliveryStreamName"]]
        for st in doc["Statement"]:
            for arn in as_list(st["Resource"]):
                expect(arn != "*" and any(n in arn for n in names), f"{name}: resource {arn} is not this stack's")

    def log_group(self, lid: str, phys: str):
        groups = self.client("logs").describe_log_groups(logGroupNamePrefix=phys)["logGroups"]
        g = [g for g in groups if g["logGroupName"] == phys]
        expect(len(g) == 1, f"log group {phys} not found")
        expect(g[0].get("retentionInDays") == 30, f"retention {g[0].get('retentionInDays')}")
        return ["exists", "retention 30 days"], []

    def ssm_parameter(self, lid: str, phys: str):
        value = self.client("ssm").get_parameter(Name=phys)["Parameter"]["Value"]
        expect(
            value == self.outputs["FloodgateToml"],
            "the Config parameter differs from the FloodgateToml output",
        )
        tomllib.loads(value)
        return ["value is the FloodgateToml output, valid TOML"], []

    def ecs_cluster(self, lid: str, phys: str):
        c = self.client("ecs").describe_clusters(clusters=[phys])["clusters"]
        expect(len(c) == 1 and c[0]["status"] == "ACTIVE", f"cluster {c}")
        return ["ACTIVE"], ["ClusterSettings (container insights)"]

    def ecs_task_definition(self, lid: str, phys: str):
        td = self.client("ecs").describe_task_definition(taskDefinition=phys)["taskDefinition"]
        expect(td["family"] == f"{STACK}-{lid.removesuffix('TaskDefinition').lower()}", f"family {td['family']}")
        (c,) = td["containerDefinitions"]
        expect(c.get("readonlyRootFilesystem") is True, "root filesystem not read-only")
        expect(c.get("user") == "65532:65532", f"user {c.get('user')}")
        expect(c["logConfiguration"]["logDriver"] == "awslogs", "logs not to CloudWatch")
        port = 8080 if lid.startswith("Edge") else 9091
        expect([p["containerPort"] for p in c["portMappings"]] == [port], f"ports {c['portMappings']}")
        command = c["command"][0]
        role_cmd = "ingest" if lid.startswith("Edge") else "process"
        expect(
            f"floodgate {role_cmd} --config /var/lib/floodgate/floodgate.toml --listen 0.0.0.0:{port}" in command,
            f"command {command}",
        )
        expect(c["healthCheck"]["command"][:3] == ["CMD", "/usr/local/bin/floodgate", "healthcheck"],
               f"health check {c['healthCheck']}")
        if lid.startswith("Edge"):
            # Probed on the operations listener, which answers while the edge is full.
            expect("--ops-listen 127.0.0.1:9092" in command, f"command {command}")
            expect(c["healthCheck"]["command"][3:] == ["--url", "http://127.0.0.1:9092/healthz"],
                   f"health check {c['healthCheck']}")
        secrets = {x["name"]: x["valueFrom"] for x in c.get("secrets", [])}
        expect(secrets.get("FLOODGATE_CONFIG_TOML") == self.physical["Config"], f"secrets {secrets}")
        expect(c.get("stopTimeout", 0) > 30, f"stop timeout {c.get('stopTimeout')}")
        return [
            "read-only root",
            "user 65532",
            f"port {port}",
            f"floodgate {role_cmd}",
            "config from the Config parameter",
            "awslogs",
            "healthcheck",
            f"stop timeout {c['stopTimeout']} s",
        ], ["RequiresCompatibilities", "NetworkMode", "Cpu", "TaskRoleArn", "ExecutionRoleArn"]

    def security_group(self, lid: str, phys: str):
        (g,) = self.client("ec2").describe_security_groups(GroupIds=[phys])["SecurityGroups"]
        expect(g["VpcId"] == self.vpc, f"vpc {g['VpcId']}")
        ingress = sorted(p.get("FromPort", -1) for p in g["IpPermissions"])
        want = sorted(p["FromPort"] for p in self.props(lid).get("SecurityGroupIngress", []))
        if lid == "EdgeSecurityGroup":
            # EdgeIngressFromLoadBalancer, a resource of its own.
            want = [8080]
            (perm,) = g["IpPermissions"]
            sources = [p["GroupId"] for p in perm.get("UserIdGroupPairs", [])]
            expect(sources == [self.physical["LoadBalancerSecurityGroup"]], f"8080 from {sources}")
        expect(ingress == want, f"ingress ports {ingress}, want {want}")
        return [f"in VPC, ingress ports {ingress or 'none'}"], ["SecurityGroupEgress (moto keeps allow-all)"]

    def security_group_ingress(self, lid: str, phys: str):
        # moto gives it no id; its rule is checked on EdgeSecurityGroup's line.
        return ["on EdgeSecurityGroup: 8080 from the load balancer's group"], []

    def load_balancer(self, lid: str, phys: str):
        elb = self.client("elbv2")
        (lb,) = elb.describe_load_balancers(LoadBalancerArns=[phys])["LoadBalancers"]
        expect(lb["Scheme"] == "internet-facing", f"scheme {lb['Scheme']}")
        expect(lb["SecurityGroups"] == [self.physical["LoadBalancerSecurityGroup"]], f"groups {lb['SecurityGroups']}")
        expect(len(lb["AvailabilityZones"]) == 2, f"zones {lb['AvailabilityZones']}")
        return ["internet-facing", "its security group", "two zones"], ["LoadBalancerAttributes"]

    def target_group(self, lid: str, phys: str):
        (tg,) = self.client("elbv2").describe_target_groups(TargetGroupArns=[phys])["TargetGroups"]
        expect(tg["Port"] == 8080 and tg["TargetType"] == "ip", f"{tg['Port']} {tg['TargetType']}")
        expect(tg["HealthCheckPath"] == "/healthz", f"health check {tg['HealthCheckPath']}")
        return ["ip targets on 8080", "health check /healthz"], []

    def listener(self, lid: str, phys: str):
        (ls,) = self.client("elbv2").describe_listeners(ListenerArns=[phys])["Listeners"]
        expect(ls["Protocol"] == "HTTPS" and ls["Port"] == 443, f"{ls['Protocol']} {ls['Port']}")
        expect(ls["DefaultActions"][0]["TargetGroupArn"] == self.physical["EdgeTargetGroup"], "default action")
        return ["HTTPS 443", ls.get("SslPolicy", "?"), "forwards to the edge"], []

    def listener_rule(self, lid: str, phys: str):
        (r,) = self.client("elbv2").describe_rules(RuleArns=[phys])["Rules"]
        paths = [v for c in r["Conditions"] for v in c.get("PathPatternConfig", {}).get("Values", c.get("Values", []))]
        expect("/metrics" in paths, f"paths {paths}")
        action = r["Actions"][0]
        expect(action["Type"] == "fixed-response" and action["FixedResponseConfig"]["StatusCode"] == "404", f"{action}")
        return ["/metrics answered 404 at the load balancer"], []

    def ecs_service(self, lid: str, phys: str):
        (s,) = self.client("ecs").describe_services(cluster=self.physical["Cluster"], services=[phys])["services"]
        td = "EdgeTaskDefinition" if lid == "EdgeService" else "WorkerTaskDefinition"
        expect(s["taskDefinition"] == self.physical[td], f"task definition {s['taskDefinition']}")
        expect(s["desiredCount"] == 2, f"desired {s['desiredCount']}")
        return [f"in {self.physical['Cluster']}", f"runs {td}", "2 tasks"], [
            "LaunchType", "NetworkConfiguration", "LoadBalancers", "DeploymentConfiguration"]

    VERIFIERS = {
        "AWS::Kinesis::Stream": kinesis_stream,
        "AWS::DynamoDB::Table": dynamodb_table,
        "AWS::S3::Bucket": s3_bucket,
        "AWS::Events::EventBus": event_bus,
        "AWS::Events::Rule": event_rule,
        "AWS::SQS::Queue": sqs_queue,
        "AWS::IAM::Role": iam_role,
        "AWS::Logs::LogGroup": log_group,
        "AWS::SSM::Parameter": ssm_parameter,
        "AWS::ECS::Cluster": ecs_cluster,
        "AWS::ECS::TaskDefinition": ecs_task_definition,
        "AWS::ECS::Service": ecs_service,
        "AWS::EC2::SecurityGroup": security_group,
        "AWS::EC2::SecurityGroupIngress": security_group_ingress,
        "AWS::ElasticLoadBalancingV2::LoadBalancer": load_balancer,
        "AWS::ElasticLoadBalancingV2::TargetGroup": target_group,
        "AWS::ElasticLoadBalancingV2::Listener": listener,
        "AWS::ElasticLoadBalancingV2::ListenerRule": listener_rule,
    }

    def verify_resources(self) -> list[str]:
        failures = []
        counts = {"created": 0, "skipped": 0}
        for lid, res in self.resources.items():
            typ = res["Type"]
            if lid in self.created:
                verifier = self.VERIFIERS.get(typ)
                if verifier is None:
                    failures.append(f"{lid} {typ}: moto created it, and this test has no verifier for {typ}")
                    print(f"FAIL     {lid} {typ}: no verifier")
                    continue
                try:
                    done, unmodelled = verifier(self, lid, self.physical[lid])
                except CheckFailed as e:
                    failures.append(f"{lid} {typ}: {e}")
                    print(f"FAIL     {lid} {typ}: {e}")
                    continue
                except Exception as e:  # an API error is a failed check, named
                    failures.append(f"{lid} {typ}: {type(e).__name__}: {e}")
                    print(f"FAIL     {lid} {typ}: {type(e).__name__}: {e}")
                    continue
                counts["created"] += 1
                note = f" (not modelled by moto: {', '.join(unmodelled)})" if unmodelled else ""
                print(f"created  {lid} {typ}: {', '.join(done)}{note}")
            elif typ in MOTO_SKIPS:
                counts["skipped"] += 1
                print(f"SKIPPED by moto: {lid} {typ}")
            else:
                failures.append(f"{lid} {typ}: missing, and moto is not known to skip {typ}")
                print(f"FAIL     {lid} {typ}: missing")
        print(
            f"resources: {counts['created']} created and verified, {counts['skipped']} skipped by "
            f"moto (not checked here), {len(failures)} failed, of {len(self.resources)}"
        )
        return failures

    # ------------------------------------------------------------------ names
    def verify_names(self) -> list[str]:
        """The stack's names at their defaults are the example configuration's."""
        example = tomllib.loads(EXAMPLE_CONFIG.read_text())
        want = {
            "StreamName": example["stream"]["kinesis"]["stream_name"],
            "QuarantineStreamName": example["stream"]["kinesis"]["stream_name"] + "-quarantine",
            "LeaseTableName": example["coordination"]["table_name"],
            "StateTableName": example["state"]["table_name"],
            "LakePrefix": example["lake"]["prefix"],
            "EventBusName": example["publish"]["event_bus_name"],
            "DeliveryStreamName": example["archive"]["delivery_stream_name"],
        }
        failures = []
        for key, value in want.items():
            if self.outputs.get(key) != value:
                failures.append(f"output {key} is {self.outputs.get(key)!r}, the example config says {value!r}")
        config = tomllib.loads(self.outputs["FloodgateToml"])
        pairs = {
            ("stream", "backend"): "kinesis",
            ("coordination", "backend"): "dynamodb",
            ("state", "backend"): "dynamodb",
            ("lake", "store"): "s3",
            ("publish", "backend"): "eventbridge",
            ("archive", "backend"): "firehose",
            ("stream", "kinesis", "stream_name"): want["StreamName"],
            ("stream", "kinesis", "quarantine_stream_name"): want["QuarantineStreamName"],
            ("coordination", "table_name"): want["LeaseTableName"],
            ("state", "table_name"): want["StateTableName"],
            ("lake", "bucket"): self.outputs["LakeBucket"],
            ("lake", "prefix"): want["LakePrefix"],
            ("publish", "event_bus_name"): want["EventBusName"],
            ("archive", "delivery_stream_name"): want["DeliveryStreamName"],
            ("aws", "region"): REGION,
        }
        for path, value in pairs.items():
            got = config
            for p in path:
                got = got.get(p, {}) if isinstance(got, dict) else None
            if got != value:
                failures.append(f"FloodgateToml {'.'.join(path)} = {got!r}, want {value!r}")
        print(
            f"names: {len(want)} outputs equal deploy/floodgate.example.toml's defaults, "
            f"{len(pairs)} FloodgateToml keys as expected" if not failures else "names: FAILED"
        )
        for f in failures:
            print(f"FAIL     {f}")
        return failures

    # ------------------------------------------------------------------ floodgate itself
    def config_for_moto(self, workdir: Path) -> Path:
        text = self.outputs["FloodgateToml"]
        lines = text.splitlines()
        at = lines.index(f'region = "{REGION}"')
        lines.insert(at + 1, f'endpoint_url = "{self.endpoint}"')
        # moto's CloudFormation did not create the delivery stream, so the check would
        # find it missing: the archive is left out of the check, and said so.
        start = lines.index("[archive]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        del lines[start:end]
        print("SKIPPED by moto: [archive] left out of the generated floodgate.toml "
              "(moto did not create DeliveryStream AWS::KinesisFirehose::DeliveryStream)")
        path = workdir / "floodgate.toml"
        path.write_text("\n".join(lines) + "\n")
        tomllib.loads(path.read_text())
        return path

    def floodgate(self, binary: str, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                   AWS_REGION=REGION, FLOODGATE_LOG="warn")
        env.pop("FLOODGATE_CONFIG", None)
        p = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=300)
        shown = " ".join(args)
        print(f"$ floodgate {shown}  -> exit {p.returncode}")
        for line in (p.stdout + p.stderr).strip().splitlines():
            print(f"    {line}")
        return p

    def verify_with_floodgate(self, binary: str, workdir: Path) -> list[str]:
        failures = []
        config = self.config_for_moto(workdir)
        check = self.floodgate(binary, "aws", "init", "--check", "--config", str(config))
        if check.returncode != 0 and "--check" in check.stderr and (
            "unexpected argument" in check.stderr or "unrecognized" in check.stderr
        ):
            failures.append(
                "`floodgate aws init --check` does not exist in this binary: the deployment "
                "cannot be checked against the code until it does (rebuild floodgate)"
            )
            print(f"FAIL     {failures[-1]}")
            have_check = False
        else:
            have_check = True
            if check.returncode != 0:
                failures.append("`floodgate aws init --check` fails on the stack as deployed")
                print(f"FAIL     {failures[-1]}")
            else:
                # One line per resource, each `ok` (or the drift it found).
                lines = [l for l in check.stdout.splitlines() if l.strip()]
                not_ok = [l for l in lines if not re.search(r"\bok\b", l)]
                if len(lines) < 6 or not_ok:
                    failures.append(f"`floodgate aws init --check` did not say ok for every resource: {not_ok or lines}")
                    print(f"FAIL     {failures[-1]}")
                else:
                    print(f"ok       floodgate aws init --check: {len(lines)} resources ok")

        # `aws init` itself checks the names and key schemas of what exists, and creates
        # only what is missing: on this stack it must create nothing.
        init = self.floodgate(binary, "aws", "init", "--config", str(config))
        lines = [l for l in init.stdout.splitlines() if l.strip()]
        if init.returncode != 0:
            failures.append("`floodgate aws init` fails on the stack as deployed")
        elif len(lines) != 6 or not all(l.endswith(": exists") for l in lines):
            failures.append(f"`floodgate aws init` did not find every resource: {lines}")
        else:
            print(f"ok       floodgate aws init: all {len(lines)} resources exist, nothing created")
        if failures and failures[-1].startswith("`floodgate aws init`"):
            print(f"FAIL     {failures[-1]}")

        if not have_check:
            print("FAIL     drift checks not run: they need `floodgate aws init --check`")
            return failures
        ddb = self.client("dynamodb")
        lease = self.outputs["LeaseTableName"]
        ddb.delete_table(TableName=lease)
        p = self.floodgate(binary, "aws", "init", "--check", "--config", str(config))
        if p.returncode == 0:
            failures.append(f"`aws init --check` passed with the lease table {lease} deleted")
            print(f"FAIL     {failures[-1]}")
        else:
            print("ok       drift: the lease table deleted, --check exits non-zero")
        ddb.create_table(
            TableName=lease,
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        p = self.floodgate(binary, "aws", "init", "--check", "--config", str(config))
        if p.returncode == 0:
            failures.append(f"`aws init --check` passed with the lease table keyed by `id`")
            print(f"FAIL     {failures[-1]}")
        else:
            print("ok       drift: the lease table keyed by `id`, --check exits non-zero")
        return failures


def as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def policy_document(doc) -> dict:
    """moto hands back a policy CloudFormation gave it as the Python repr of a dict."""
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(doc)
    except json.JSONDecodeError:
        return ast.literal_eval(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="moto server, http://127.0.0.1:PORT")
    ap.add_argument("--floodgate", required=True, help="the floodgate binary")
    ap.add_argument("--workdir", required=True, help="a scratch directory")
    args = ap.parse_args()
    d = Deployment(args.endpoint)
    try:
        d.deploy()
    except CheckFailed as e:
        print(f"FAIL     deploy: {e}")
        return 1
    failures = d.verify_resources()
    failures += d.verify_names()
    failures += d.verify_with_floodgate(args.floodgate, Path(args.workdir))
    if failures:
        print(f"deployment test FAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("deployment test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
