"""provision.yml and teardown.yml, for real, against moto: a local server that speaks the AWS API.

The playbooks run from ansible/ as a person runs them, with AWS_URL pointing every AWS module and
the inventory plugin at moto. The test reads what they made back through the AWS API (boto3),
asks the inventory for its hosts and groups, runs provision a second time, tears everything
down and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_deploy import _recap, _tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ANSIBLE_DIR = REPO_ROOT / "ansible"
REGION = "eu-west-1"  # ansible/aws.yml and inventory/aws_ec2.yml
ADMIN_CIDR = "203.0.113.0/24"
# A public key for the admin user's key pair (its private half was thrown away).
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII0kSb+zbn/mUQKxgcQyXXYS9TwgOcwM7URHt2IPpki3 saldo-test"
SERVER_READY_TIMEOUT_S = 30.0
PLAYBOOK_TIMEOUT_S = 300
# Every port the deployment listens on between its hosts (group_vars/all/main.yml), MariaDB's included.
CLUSTER_PORTS = [3306, 5555, 6001, 6002, 6003, 6004, 6005, 6007, 6008, 8765, 8766, 8767, 8768, 50051]


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto server on a free loopback port; the environment that points AWS clients at it."""
    moto_server = _tool("moto_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=output,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        env = {**os.environ, "AWS_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
               "ANSIBLE_NOCOLOR": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
        yield env
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _ec2(env: dict):
    import boto3

    return boto3.client("ec2", endpoint_url=env["AWS_URL"], region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _playbook(env: dict, playbook: str, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(_tool("ansible-playbook")), playbook, *extra], cwd=ANSIBLE_DIR, env=env,
                          capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    return done


def _plain(value):
    """A value from `ansible-inventory --list`, which marks values from a plugin as unsafe."""
    return value["__ansible_unsafe"] if isinstance(value, dict) and "__ansible_unsafe" in value else value


def _instances(ec2, states=("pending", "running", "stopping", "stopped")) -> list[dict]:
    pages = ec2.describe_instances(Filters=[{"Name": "tag:saldo_cluster", "Values": ["saldo"]},
                                            {"Name": "instance-state-name", "Values": list(states)}])
    return [instance for reservation in pages["Reservations"] for instance in reservation["Instances"]]


def test_provision_creates_three_tagged_instances_and_one_closed_security_group_and_teardown_removes_them(aws, tmp_path):
    ec2 = _ec2(aws)
    image = ec2.register_image(Name="debian-12-amd64-20250101-1", RootDeviceName="/dev/xvda",
                               BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}])["ImageId"]
    key_file = tmp_path / "admin.pub"
    key_file.write_text(PUBLIC_KEY + "\n")
    account = ec2.describe_images(ImageIds=[image])["Images"][0]["OwnerId"]
    extra = ["-e", f"saldo_aws_admin_cidr={ADMIN_CIDR}", "-e", f"saldo_aws_ami_owner={account}",
             "-e", f"saldo_aws_ssh_public_key_file={key_file}"]

    _playbook(aws, "provision.yml", *extra)

    instances = _instances(ec2, states=("running",))
    tags = sorted((tag["Name"], tag["saldo_group"]) for tag in ({t["Key"]: t["Value"] for t in i["Tags"]} for i in instances))
    assert tags == [("orchestrator01", "orchestrator"), ("replica01", "replicas"), ("replica02", "replicas")]
    assert {i["ImageId"] for i in instances} == {image}
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["saldo-cluster"]}])["SecurityGroups"]
    assert len(groups) == 1
    group = groups[0]
    assert all([g["GroupId"] for g in i["SecurityGroups"]] == [group["GroupId"]] for i in instances)
    rules = sorted((p["IpProtocol"], p["FromPort"], p["ToPort"], tuple(sorted(g["GroupId"] for g in p.get("UserIdGroupPairs", []))),
                    tuple(sorted(r["CidrIp"] for r in p.get("IpRanges", []))), tuple(p.get("Ipv6Ranges", [])))
                   for p in group["IpPermissions"])
    expected = sorted([("tcp", port, port, (group["GroupId"],), (), ()) for port in CLUSTER_PORTS]
                      + [("tcp", 22, 22, (), (ADMIN_CIDR,), ())])
    assert rules == expected

    # The inventory finds the three hosts by their tags, in their groups, with AWS's addresses.
    done = subprocess.run([str(_tool("ansible-inventory")), "--list"], cwd=ANSIBLE_DIR, env=aws, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    inventory = json.loads(done.stdout)
    assert inventory["orchestrator"]["hosts"] == ["orchestrator01"]
    assert sorted(inventory["replicas"]["hosts"]) == ["replica01", "replica02"]
    by_name = {next(t["Value"] for t in i["Tags"] if t["Key"] == "Name"): i for i in instances}
    for name, instance in by_name.items():
        hostvars = inventory["_meta"]["hostvars"][name]
        assert _plain(hostvars["saldo_address"]) == instance["PrivateIpAddress"]
        assert _plain(hostvars["ansible_host"]) == instance["PublicIpAddress"]

    # A second run finds everything in place.
    second = _playbook(aws, "provision.yml", *extra)
    assert _recap(second.stdout)["localhost"]["changed"] == 0, second.stdout[-4000:]

    _playbook(aws, "teardown.yml", "-e", f"saldo_aws_ssh_public_key_file={key_file}")
    assert _instances(ec2) == []
    assert ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["saldo-cluster"]}])["SecurityGroups"] == []
    assert ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["saldo-admin"]}])["KeyPairs"] == []
