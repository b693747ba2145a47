#!/usr/bin/env python
"""Run one RecurJac job on a SLURM cluster through dask-jobqueue.

This process runs the dask scheduler and the client (start it on a login node, or as the first step of a small
``sbatch`` allocation); it submits ``--jobs`` worker jobs with ``sbatch``, waits for the workers, plans the job,
runs it on the cluster with a checkpoint in a shared folder, writes the result store, and releases the workers.

Requirements: ``pip install 'recurjac-scale[cluster]'`` in an environment the compute nodes can use (the same
path, e.g. on a shared file system; ``--prologue 'source /path/venv/bin/activate'``), and the model store, the
input file, the checkpoint folder and the output on a file system every node reaches.

Example::

    python scripts/slurm_job.py MODEL.zarr --input x0.npy --eps 0.001 --method recurjac-f0 \\
        --queue compute --account proj42 --cores 8 --memory 32GiB --walltime 02:00:00 --jobs 8 \\
        --prologue 'source ~/venvs/rj/bin/activate' --checkpoint /shared/rj/ckpt -o /shared/rj/result.zarr

    python scripts/slurm_job.py MODEL.zarr ... --dry-run     # print the sbatch script and the plan, submit nothing

A killed run (walltime, node failure, Ctrl-C) is resumed by running the same command again: the finished blocks
recorded in ``--checkpoint`` are not recomputed.

Batch certification (``recurjac-scale certify`` on the SLURM workers): the first argument ``certify``, then the
certify command's own arguments (``recurjac-scale certify --help``) and the SLURM options above; ``--json`` (on a
shared file system) is required, and rerunning the same command resumes from it (``--tls-ca-file/--tls-cert/--tls-key``
apply to the scheduler, the workers and the command's client alike)::

    python scripts/slurm_job.py certify MODEL.zarr --inputs mnist_test.csv --scale 255 --target runnerup,least \
        --json /shared/rj/certify.jsonl --queue compute --cores 8 --memory 32GiB --jobs 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zarr model store")
    ap.add_argument("--input", required=True, help=".npy file with x0 (n_0,) or a batch (see --index)")
    ap.add_argument("--index", type=int, default=0, help="row of a batch input file")
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--p", default="inf")
    ap.add_argument("--method", default="recurjac-b", help="fastlip, recurjac-b, recurjac-f0, recurjac-f1")
    ap.add_argument("--layer-bounds", default="crown")
    ap.add_argument("--outputs", default=None, help="'all' (default), a logit index, or 'c,j' for f_c - f_j")
    ap.add_argument("-o", "--output", required=True, help="result zarr store (shared file system)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (shared file system)")
    ap.add_argument("--overwrite", action="store_true")
    # SLURM
    ap.add_argument("--jobs", type=int, default=2, help="worker jobs to submit")
    ap.add_argument("--queue", default=None, help="partition (#SBATCH -p)")
    ap.add_argument("--account", default=None, help="#SBATCH -A")
    ap.add_argument("--cores", type=int, default=4, help="cores per job (= single-threaded worker processes)")
    ap.add_argument("--memory", default="16GiB", help="memory per job")
    ap.add_argument("--walltime", default="01:00:00")
    ap.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                    help="extra #SBATCH directive, e.g. --job-extra=--exclusive (repeatable)")
    ap.add_argument("--prologue", action="append", default=[], metavar="LINE",
                    help="shell line run before the worker starts, e.g. 'module load python' (repeatable)")
    ap.add_argument("--interface", default=None, help="network interface of scheduler and workers, e.g. ib0")
    ap.add_argument("--local-directory", default=None, help="node-local spill folder of the workers")
    ap.add_argument("--log-directory", default=None, help="folder for the SLURM job logs")
    ap.add_argument("--memory-budget", default=None,
                    help="per-worker budget for the plan's block sizes (default: job memory / cores)")
    ap.add_argument("--wait-timeout", type=float, default=1800, help="seconds to wait for the first worker")
    ap.add_argument("--tls-ca-file", default=None, metavar="PEM",
                    help="enable dask TLS for a shared cluster: the certificate authority (with --tls-cert, --tls-key)")
    ap.add_argument("--tls-cert", default=None, metavar="PEM", help="certificate of scheduler, workers and client")
    ap.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    ap.add_argument("--dry-run", action="store_true", help="print the job script and the plan; submit nothing")
    ap.add_argument("--local-test", type=int, default=None, metavar="N",
                    help="no SLURM: run the same job on a local cluster of N workers (to try the script out; with "
                         "--tls-* the local cluster uses TLS too)")
    return ap


def _load_chain(spec) -> None:
    """Read the weights and build the job's chain once in each worker before the graph runs (fails early on a
    worker that cannot read the store; reads it with dask's synchronous scheduler, never through the cluster)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        spec.chain()


def _outputs(s):
    if s is None or s == "all":
        return None
    if "," in s:
        c, j = s.split(",", 1)
        return (int(c), int(j))
    return int(s)


def security_from_args(args):
    """A ``distributed.security.Security`` requiring TLS for every connection (scheduler, workers, client), from
    ``--tls-ca-file/--tls-cert/--tls-key``; ``None`` without them."""
    given = [args.tls_ca_file, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise SystemExit("slurm_job.py: error: TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
    from distributed.security import Security

    return Security(
        tls_ca_file=args.tls_ca_file,
        tls_client_cert=args.tls_cert, tls_client_key=args.tls_key,
        tls_scheduler_cert=args.tls_cert, tls_scheduler_key=args.tls_key,
        tls_worker_cert=args.tls_cert, tls_worker_key=args.tls_key,
        require_encryption=True,
    )


def client_tls_config(security) -> dict:
    """The dask configuration that makes every ``distributed.Client`` opened without an explicit ``security``
    (as ``recurjac-scale certify --scheduler ADDRESS`` opens its own) use the client side of ``security``:
    ``Client(address)`` builds ``Security()``, which reads these keys.  Empty for ``None``."""
    if security is None:
        return {}
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": security.tls_ca_file,
        "distributed.comm.tls.client.cert": security.tls_client_cert,
        "distributed.comm.tls.client.key": security.tls_client_key,
    }


@contextlib.contextmanager
def local_test_client(n_workers: int, memory_limit, security=None):
    """The client of ``--local-test``: :func:`recurjac_scale.cluster.local_client` (N worker processes on
    127.0.0.1), or with ``--tls-*`` a TLS ``LocalCluster`` whose scheduler, workers and client all use ``security``
    (the same certificates as the SLURM job), so that the TLS setup is tried out too."""
    from recurjac_scale.cluster import local_client, worker_env

    if security is None:
        with local_client(n_workers, memory_limit=memory_limit) as client:
            yield client
        return
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, protocol="tls", host="127.0.0.1",
                      security=security, dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                      memory_limit=memory_limit,
                      env=worker_env(None)) as cluster, Client(cluster, security=security) as client:
        yield client


def certify_on(address: str, rest, security=None) -> int:
    """Run ``recurjac-scale certify REST --scheduler ADDRESS`` in this process, its client using ``security``."""
    import dask

    from recurjac_scale.cli import main as cli_main

    with dask.config.set(client_tls_config(security)):
        return cli_main(["certify", *rest, "--scheduler", address])


def _slurm_parser() -> argparse.ArgumentParser:
    """The SLURM options of :func:`_parser` alone (for ``certify``)."""
    full = _parser()
    ap = argparse.ArgumentParser(description="certify on SLURM workers", add_help=False)
    keep = {"--jobs", "--queue", "--account", "--cores", "--memory", "--walltime", "--job-extra", "--prologue",
            "--interface", "--local-directory", "--log-directory", "--wait-timeout", "--dry-run", "--local-test",
            "--tls-ca-file", "--tls-cert", "--tls-key"}
    for act in full._actions:
        if act.option_strings and act.option_strings[0] in keep:
            ap._add_action(act)
    return ap


def certify_main(argv) -> int:
    """``certify``: the batch command on the cluster's workers (``--scheduler`` set to the cluster's address).
    With ``--tls-*`` the scheduler, the workers and the command's client all use TLS."""
    from recurjac_scale.cli import main as cli_main
    from recurjac_scale.cluster import slurm_cluster, slurm_cluster_kwargs, slurm_job_script

    args, rest = _slurm_parser().parse_known_args(argv)
    security = security_from_args(args)
    if "--json" not in rest:
        print("slurm_job.py certify: error: --json OUT (on a shared file system) is required", file=sys.stderr)
        return 2
    if any(a in ("--scheduler", "--workers") for a in rest):
        print("slurm_job.py certify: error: --scheduler / --workers are set by this script", file=sys.stderr)
        return 2
    slurm = dict(queue=args.queue, account=args.account, cores=args.cores, memory=args.memory,
                 walltime=args.walltime, job_extra_directives=args.job_extra, prologue=args.prologue,
                 interface=args.interface, local_directory=args.local_directory, log_directory=args.log_directory)
    if security is not None:
        slurm["security"] = security  # the scheduler and workers; the certify client gets it in certify_on
    slurm_cluster_kwargs(**slurm)
    if args.dry_run:
        print(slurm_job_script(**slurm))
        print("recurjac-scale certify " + " ".join(rest) + " --scheduler tcp://SCHEDULER:8786", file=sys.stderr)
        return 0
    if args.local_test:
        if security is None:
            return cli_main(["certify", *rest, "--workers", str(args.local_test)])
        with local_test_client(args.local_test, "auto", security) as client:
            return certify_on(client.scheduler.address, rest, security)
    from distributed import Client

    with slurm_cluster(**slurm) as cluster:
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; submitted {args.jobs} job(s)", file=sys.stderr, flush=True)
        with Client(cluster) as client:  # takes the cluster's security
            client.wait_for_workers(1, timeout=args.wait_timeout)
            rc = certify_on(cluster.scheduler_address, rest, security)
        cluster.scale(0)
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "certify":
        return certify_main(argv[1:])
    args = _parser().parse_args(argv)
    security = security_from_args(args)
    from recurjac_scale.cli._common import load_inputs
    from recurjac_scale.cluster import slurm_cluster, slurm_cluster_kwargs, slurm_job_script
    from recurjac_scale.engine.plan import parse_bytes, plan_jacobian
    from recurjac_scale.network.store import open_network

    slurm = dict(queue=args.queue, account=args.account, cores=args.cores, memory=args.memory,
                 walltime=args.walltime, job_extra_directives=args.job_extra, prologue=args.prologue,
                 interface=args.interface, local_directory=args.local_directory, log_directory=args.log_directory)
    if security is not None:
        slurm["security"] = security  # dask-jobqueue: TLS scheduler, workers started with the same certificates
    slurm_cluster_kwargs(**slurm)  # validate before anything starts
    budget = args.memory_budget or int(parse_bytes(args.memory) * 0.6 / args.cores)

    net = open_network(args.model)
    x = load_inputs(args.input, net)[args.index]
    plan = plan_jacobian(args.model, x, args.eps, args.p, args.method, layer_bounds=args.layer_bounds,
                         outputs=_outputs(args.outputs), memory_budget=budget, threads_per_worker=1,
                         total_threads=args.jobs * args.cores)
    print(plan.describe(), file=sys.stderr)
    if args.dry_run:
        print(slurm_job_script(**slurm))
        return 0

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.local_test:
        with local_test_client(args.local_test, budget * 2, security) as client:
            client.run(_load_chain, plan.context.worker_spec())
            res = plan.compute(client=client, checkpoint=args.checkpoint, output=args.output,
                               overwrite=args.overwrite, log=log)
        print(json.dumps(res.to_dict(), indent=1, default=str))
        return 0

    from distributed import Client

    with slurm_cluster(**slurm) as cluster:
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; submitted {args.jobs} job(s); dashboard "
              f"{cluster.dashboard_link}", file=sys.stderr, flush=True)
        with Client(cluster) as client:
            t = time.perf_counter()
            client.wait_for_workers(1, timeout=args.wait_timeout)
            print(f"first worker after {time.perf_counter() - t:.0f} s; running", file=sys.stderr, flush=True)
            # Workers that join later build the chain in their first task.
            client.run(_load_chain, plan.context.worker_spec())
            res = plan.compute(client=client, checkpoint=args.checkpoint, output=args.output,
                               overwrite=args.overwrite, progress=True, log=log)
        cluster.scale(0)
    print(json.dumps(res.to_dict(), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
