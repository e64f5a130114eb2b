#!/usr/bin/env python3
"""An example cloud-scheduler client of vmgov's FleetService, in Python with grpcio.

Before placing a VM, a scheduler asks the coordinator what each hardware class would do with
it: the predicted performance, power and throughput ratios at every P-state, and the P-state
vmgov would choose under the VM's thresholds. Then it sets the VM's thresholds.

The stubs are generated at start from vmgov's .proto with grpcio-tools (pip install grpcio
grpcio-tools), so the example needs nothing but the contract file.

    python3 examples/scheduler.py --coordinator 127.0.0.1:7700 --vm VM-UUID \
        --classes phenom-9500,epyc-7502 --perf 0.7 --throughput 0.7
"""

import argparse
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "proto", "proto")
PROTO = "vmgov/v1/vmgov.proto"
# vmgov's stable feature names (vmgov-proto's `features` module).
FEATURES = [
    "l2_misses_per_instruction", "l3_misses_per_instruction", "memory_accesses_per_instruction",
    "packets_per_second", "disk_reads_per_second", "disk_read_bytes_per_second",
    "disk_writes_per_second", "disk_write_bytes_per_second", "vcpu_utilization",
]


def stubs():
    """Generates and imports the vmgov.v1 Python modules."""
    out = tempfile.mkdtemp(prefix="vmgov-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        sys.exit(f"generating the stubs from {PROTO} failed (protoc exit {rc})")
    sys.path.insert(0, out)
    return (importlib.import_module("vmgov.v1.vmgov_pb2"),
            importlib.import_module("vmgov.v1.vmgov_pb2_grpc"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default="127.0.0.1:7700", help="host:port of a coordinator")
    p.add_argument("--vm", required=True, help="the VM's UUID")
    p.add_argument("--classes", default="phenom-9500,epyc-7502", help="hardware classes to compare")
    p.add_argument("--perf", type=float, default=0.7, help="performance threshold, a fraction")
    p.add_argument("--throughput", type=float, default=0.7, help="throughput threshold, a fraction")
    p.add_argument("--l3-misses-per-instruction", type=float, default=0.01,
                   help="the VM's measured L3 misses per instruction (other features 0)")
    args = p.parse_args()

    pb, rpc = stubs()
    channel = grpc.insecure_channel(args.coordinator)
    fleet = rpc.FleetServiceStub(channel)
    # A model names the features it needs; a scheduler sends what it measured for the VM (here
    # one value from the command line, the rest 0: an idle disk and network).
    values = {name: 0.0 for name in FEATURES}
    values["l3_misses_per_instruction"] = args.l3_misses_per_instruction
    features = pb.FeatureValues(values=values)
    thresholds = pb.Thresholds(perf=args.perf, throughput=args.throughput)
    for cls in args.classes.split(","):
        try:
            r = fleet.Predict(pb.PredictRequest(hardware_class=cls, features=features,
                                                thresholds=thresholds,
                                                objective=pb.OBJECTIVE_ENERGY), timeout=10)
        except grpc.RpcError as e:
            sys.exit(f"Predict on {cls} failed: {e.code().name}: {e.details()}")
        chosen = r.pstates[r.chosen_pstate_index]
        print(f"class {cls}: model v{r.model_version} chooses {r.chosen_frequency_hz / 1e9:.2f} GHz "
              f"(perf {chosen.predicted.perf:.3f}, power {chosen.predicted.power:.3f}, "
              f"feasible {r.feasible})")
    scope = pb.ThresholdScope(vm_id=args.vm)
    try:
        e = fleet.SetThreshold(pb.SetThresholdRequest(scope=scope, thresholds=thresholds,
                                                      updated_by="example-scheduler"), timeout=10)
    except grpc.RpcError as err:
        sys.exit(f"SetThreshold failed: {err.code().name}: {err.details()}")
    print(f"set vm/{args.vm}: perf {e.thresholds.perf:.2f}, throughput {e.thresholds.throughput:.2f}")


if __name__ == "__main__":
    main()
