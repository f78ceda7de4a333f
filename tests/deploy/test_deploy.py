"""The files in deploy/ parse, and everything they name exists in the code.

No Docker engine, cluster or systemd runs in the tests, so each file is parsed instead: the
compose file and every Kubernetes document with PyYAML, the systemd units with configparser,
the Dockerfiles line by line. The names in them are then checked against the code: ``svdfarm``
commands against the real argument parser, queue names against ``svdfarm.queues``,
``SVDFARM_*`` variables against the settings, stop grace periods against the worker's stop
timeout, and each GPU pool's KEDA query (its backlog in the ``jobs`` table, since the dispatcher)
against the queues its cards serve; that query also runs on a migrated PostgreSQL when
``SVDFARM_TEST_DATABASE_URL`` names one.
"""

from __future__ import annotations

import configparser
import contextlib
import copy
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cli import build_parser
from svdfarm import dispatch
from svdfarm.catalog import DEFAULT_MODELS, catalog_keys, parse_models, queue_key
from svdfarm.db import Database, upgrade
from svdfarm.models import Job, utcnow
from svdfarm.queues import PRECISION_CLASSES, all_queues, expand_queues, parse_queue, queues_for
from svdfarm.settings import load_settings
from svdfarm.states import JobState
from tests.conftest import DATABASES
from tests.rows import job_row

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
#: A stopped worker needs a moment after SVDFARM_STOP_TIMEOUT to requeue its job and exit.
GRACE_MARGIN_S = 30
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: The worker extra's packages: only the worker needs them; the web image has none of them.
WORKER_ONLY = {
    canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["worker"]
}
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "diffusers", "transformers", "accelerate"}
QUEUE_LIKE = re.compile(r"\bsvd\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_-]+)*")
#: The queue keys of the default catalog's models (svd.cuda.bf16.24g.svd-xt ...).
MODEL_KEYS = catalog_keys(parse_models(DEFAULT_MODELS))
SETTING = re.compile(r"\bSVDFARM_[A-Z0-9_]*[A-Z0-9]")
WRAPPERS = {"tini", "--", "exec"}
GPU_PRODUCT = "nvidia.com/gpu.product"
CLASS_LABEL = "svdfarm/worker-class"


def _gpu(total_memory_bytes: int, bf16: bool) -> dict[str, Any]:
    """What ``svdfarm worker`` would probe on one CUDA card (the fields routing reads)."""
    return {
        "device": "cuda",
        "total_memory_bytes": total_memory_bytes,
        "bf16_driver": bf16,
        "bf16_op": bf16,
        "fp16": True,
    }


#: Realistic probes of common cards, keyed by GPU Feature Discovery's node label value.
GPU_PROFILES = {
    "NVIDIA-H200": _gpu(150_119_645_184, bf16=True),
    "NVIDIA-H100-80GB-HBM3": _gpu(85_045_870_592, bf16=True),
    "NVIDIA-A100-SXM4-80GB": _gpu(85_094_825_984, bf16=True),
    "NVIDIA-A100-SXM4-40GB": _gpu(42_314_694_656, bf16=True),
    "NVIDIA-L40S": _gpu(47_697_362_944, bf16=True),
    "NVIDIA-A10G": _gpu(23_609_475_072, bf16=True),
    "NVIDIA-L4": _gpu(23_580_639_232, bf16=True),
    "Tesla-V100-SXM2-32GB": _gpu(34_089_730_048, bf16=False),
    "Tesla-V100-SXM2-16GB": _gpu(16_935_419_904, bf16=False),
    "Tesla-T4": _gpu(15_655_829_504, bf16=False),
}


# ---- reading the files -------------------------------------------------------------------


def deploy_files() -> list[Path]:
    """Every file under deploy/."""
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def compose() -> dict[str, Any]:
    """The compose file, anchors and merge keys resolved."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def k8s_docs() -> list[dict[str, Any]]:
    """Every Kubernetes document under deploy/k8s, in file order."""
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def k8s(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The documents of one kind, by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment, Job or similar."""
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """A workload's init containers and containers."""
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_argv(container: dict[str, Any]) -> list[str]:
    """A container's command line: its command, then its args."""
    return [*container.get("command", []), *container.get("args", [])]


def runs(workload: dict[str, Any], *words: str) -> bool:
    """True when one of the workload's containers runs ``svdfarm <words>``."""
    return any(
        (svdfarm_args(container_argv(c)) or [])[: len(words)] == list(words)
        for c in containers(workload)
    )


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment: its ConfigMaps, Secrets and own variables."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            env.update(k8s(docs, "Secret")[source["secretRef"]["name"]].get("stringData", {}))
    env.update({e["name"]: str(e.get("value", "")) for e in container.get("env", [])})
    return env


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment as a dict (it may be written as a list)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def read_unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit read by configparser (keys keep their case; a repeated key: the last)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(), source=str(path))
    return parser


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of a key systemd lets repeat (Environment=, ExecStart=...), in order."""
    lines = path.read_text().splitlines()
    return [line.split("=", 1)[1].strip() for line in lines if line.startswith(f"{key}=")]


def units() -> list[Path]:
    """The systemd units."""
    return sorted((DEPLOY / "systemd").glob("*.service"))


def dockerfiles() -> list[Path]:
    """The Dockerfiles (not their .dockerignore files)."""
    return sorted(p for p in DEPLOY.glob("Dockerfile*") if p.suffix != ".dockerignore")


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, rest), continuations joined, ARGs expanded."""
    joined: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending.strip())
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends in a line continuation"
    args: dict[str, str] = {}
    instructions = []
    for text in joined:
        keyword, _, rest = text.partition(" ")
        for name, value in args.items():
            rest = rest.replace(f"${{{name}}}", value).replace(f"${name}", value)
        if keyword.upper() == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at ``&&``, ``||``, ``;`` and pipes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    """Each ``pip install`` in RUN lines: (its options, its requirements), in order."""
    takes_value = {"-i", "--index-url", "--extra-index-url", "-r", "-c", "-f", "--find-links"}
    found = []
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        for words in shell_commands(rest):
            if "pip" not in [w.rsplit("/", 1)[-1] for w in words] or "install" not in words:
                continue
            words = words[words.index("install") + 1 :]
            options, requirements = [], []
            while words:
                word = words.pop(0)
                if word.startswith("-"):
                    options.append(word)
                    if word in takes_value and words:
                        options.append(words.pop(0))
                else:
                    requirements.append(word)
            found.append((options, requirements))
    return found


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON) form."""
    values = [rest for kw, rest in instructions if kw == keyword]
    if not values:
        return []
    argv: list[str] = json.loads(values[-1])
    return argv


# ---- commands ----------------------------------------------------------------------------


def svdfarm_args(argv: list[str]) -> list[str] | None:
    """The arguments given to ``svdfarm`` in ``argv``; None when it runs another program."""
    for index, word in enumerate(argv):
        if word.rsplit("/", 1)[-1] == "svdfarm":
            return argv[index + 1 :]
        if word not in WRAPPERS:
            return None
    return None


def markdown_commands(text: str) -> Iterator[list[str]]:
    """Command lines in a Markdown file: code block lines and inline code spans."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        yield from (shlex.split(line, comments=True) for line in block.splitlines())
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        with contextlib.suppress(ValueError):
            words = shlex.split(span)
            if len(words) > 1:  # a lone `svdfarm` names the project, not a command
                yield words


def all_commands() -> list[tuple[str, list[str]]]:
    """Every command line of deploy/, as (where, argv)."""
    found: list[tuple[str, list[str]]] = []
    for name, service in compose()["services"].items():
        argv: list[str] = []
        for key in ("entrypoint", "command"):
            value = service.get(key) or []
            argv += shlex.split(value) if isinstance(value, str) else value
        found.append((f"compose service {name}", argv))
    for doc in k8s_docs():
        if "template" in doc.get("spec", {}):
            for c in containers(doc):
                where = f"{doc['kind']} {doc['metadata']['name']}/{c['name']}"
                found.append((where, container_argv(c)))
    for path in units():
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecReload"):
            for value in unit_values(path, key):
                found.append((f"{path.name} {key}", shlex.split(value.lstrip("-@+!:"))))
    for path in dockerfiles():
        instructions = dockerfile(path)
        found.append(
            (path.name, exec_form(instructions, "ENTRYPOINT") + exec_form(instructions, "CMD"))
        )
    for path in DEPLOY.rglob("*.md"):
        found += [(path.name, argv) for argv in markdown_commands(path.read_text()) if argv]
    return found


def command_problem(args: list[str]) -> str | None:
    """Why ``svdfarm <args>`` would not parse, or None when it does."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(args)
    except SystemExit:
        return f"`svdfarm {' '.join(args)}`: {stderr.getvalue().strip().splitlines()[-1]}"
    # argparse takes --gpu for --gpus; a file should not rely on that, so spell flags out.
    usage = io.StringIO()
    with contextlib.redirect_stdout(usage), contextlib.suppress(SystemExit):
        # The help of the subcommand itself (``storage migrate``), not of its group.
        words = list(itertools.takewhile(lambda w: not w.startswith("-"), args))
        build_parser().parse_args([*words, "--help"])
    flags = {word.split("=")[0] for word in args if word.startswith("--") and word != "--"}
    short = [
        f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage.getvalue())
    ]
    return f"`svdfarm {' '.join(args)}`: abbreviated flag(s) {short}" if short else None


def roles(where_prefix: str) -> set[str]:
    """Which of web, worker and migrate the commands found at ``where_prefix`` run."""
    found = set()
    for where, argv in all_commands():
        args = svdfarm_args(argv)
        if where.startswith(where_prefix) and args:
            found.add("migrate" if args[:2] == ["db", "upgrade"] else args[0])
    return found


# ---- names ---------------------------------------------------------------------------------


def queue_problems(text: str) -> list[str]:
    """Queue-like names in ``text`` that are not queues of svdfarm.queues."""
    problems = []
    for name in QUEUE_LIKE.findall(text):
        try:
            parse_queue(name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if name not in all_queues() and name not in all_queues(MODEL_KEYS):
            problems.append(f"{name!r} is not in all_queues()")
    return problems


def known_settings() -> set[str]:
    """The SVDFARM_* names the code reads: literals, and the settings module's helpers."""
    names = set()
    for package in ("svdfarm", "web", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            names.update(re.findall(r'"(SVDFARM_[A-Z0-9_]+)"', text))
            helper = r'_(?:str|int|bool|float)\(\s*env,\s*"([A-Z0-9_]+)"'
            names.update(f"SVDFARM_{name}" for name in re.findall(helper, text))
    return names


def setting_problems(text: str, known: set[str]) -> list[str]:
    """SVDFARM_* names in ``text`` that svdfarm does not read."""
    return [f"{name} is not a setting" for name in SETTING.findall(text) if name not in known]


def stop_timeout(env: dict[str, str]) -> int:
    """The worker's SVDFARM_STOP_TIMEOUT under ``env`` (the settings' default when unset)."""
    given = {k: v for k, v in env.items() if k == "SVDFARM_STOP_TIMEOUT"}
    return load_settings(given).stop_timeout_s


def seconds(value: Any) -> float:
    """A duration as compose or systemd write it (``660``, ``660s``, ``11m``, ``10min 30s``)."""
    if isinstance(value, (int, float)) or str(value).strip().isdigit():
        return float(value)
    units = {"h": 3600, "min": 60, "m": 60, "sec": 1, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|sec|ms|us|h|m|s)", str(value))
    assert parts, f"cannot read the duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- GPU pools -------------------------------------------------------------------------------


def worker_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments whose container runs ``svdfarm worker``, by name."""
    return {name: d for name, d in k8s(docs, "Deployment").items() if runs(d, "worker")}


def consumed(deployment: dict[str, Any]) -> list[str]:
    """The queues a worker Deployment's pods consume: pinned with --queues, else the probe's."""
    product = pod_spec(deployment).get("nodeSelector", {}).get(GPU_PRODUCT)
    name = deployment["metadata"]["name"]
    assert product in GPU_PROFILES, (
        f"{name}: node selector {GPU_PRODUCT}={product!r} has no profile in GPU_PROFILES; "
        "add the card's probed memory and bf16 support there"
    )
    worker = next(c for c in containers(deployment) if svdfarm_args(container_argv(c)))
    env = container_env(worker, k8s_docs())
    wanted = env.get("SVDFARM_WORKER_MODELS", "")
    # Without a list a pod serves what its cache holds, which no query written here can know.
    assert wanted, f"{name}: set SVDFARM_WORKER_MODELS so its ScaledObject can count its queues"
    catalog = load_settings(env).catalog
    keys = [queue_key(catalog, entry.source) for entry in parse_models(wanted)]
    served = queues_for(GPU_PROFILES[product], keys)
    args = svdfarm_args(container_argv(worker)) or []
    pinned = build_parser().parse_args(args).queues
    queues = expand_queues([q for q in pinned.split(",") if q], keys) or served
    extra = sorted(set(queues) - set(served))
    assert not extra, f"{name}: a {product} never serves {extra} (it serves {served})"
    return queues


def best_class(queues: list[str]) -> str:
    """The class a pool is named for: its best precision at its largest tier."""
    classes = [parse_queue(q) for q in queues]
    precision = min((c.precision for c in classes), key=PRECISION_CLASSES.index)
    return max((c for c in classes if c.precision == precision), key=lambda c: c.tier_gb).queue


#: The one query a pool's ScaledObject scales on: its queued jobs, across the queues it wakes
#: the pool for. Whitespace is free (YAML folds the lines); any other change of shape fails.
BACKLOG_QUERY = re.compile(
    r"SELECT count\(\*\) FROM jobs WHERE state = 'queued' AND queue IN \( ?(?P<queues>[^()]*?) ?\)"
)
#: What KEDA's postgresql scaler reads from a TriggerAuthentication (or the trigger itself).
POSTGRESQL_AUTH = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}
#: The parameters that make a connection when no ``connection`` string is given.
POSTGRESQL_PARTS = {"host", "port", "userName", "dbName", "sslmode"}


def backlog_queues(query: str) -> list[str]:
    """The queues a pool's backlog query counts, in its order; ValueError when the query is
    not ``SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ('q1', 'q2', ...)``."""
    normal = " ".join(query.split())
    match = BACKLOG_QUERY.fullmatch(normal)
    if not match:
        raise ValueError(
            f"query {normal!r} is not SELECT count(*) FROM jobs WHERE state = 'queued' "
            "AND queue IN ('<queue>', ...)"
        )
    queues = []
    for item in match["queues"].split(","):
        quoted = re.fullmatch(r"'([a-z0-9._-]+)'", item.strip())
        if not quoted:
            raise ValueError(f"{item.strip()!r} in query {normal!r} is not a quoted queue name")
        queues.append(quoted[1])
    return queues


def backlog_trigger(scaled: dict[str, Any]) -> dict[str, Any]:
    """A ScaledObject's one trigger (it must have exactly one)."""
    (trigger,) = scaled["spec"]["triggers"]
    found: dict[str, Any] = trigger
    return found


def scaling_problems(name: str, scaled: dict[str, Any]) -> list[str]:
    """Why a ScaledObject does not scale on its pool's backlog, one pod per queued job: one
    ``postgresql`` trigger, target 1, activation 0, numbers as strings, no formula left over."""
    spec = scaled["spec"]
    problems = []
    triggers = spec.get("triggers", [])
    if len(triggers) != 1:
        problems.append(
            f"{name}: {len(triggers)} triggers, not 1: one query counts all the pool's queues"
        )
    if "scalingModifiers" in spec.get("advanced", {}):
        problems.append(f"{name}: advanced.scalingModifiers left over: one query sums the queues")
    for trigger in triggers:
        meta = trigger.get("metadata", {})
        if trigger.get("type") != "postgresql":
            problems.append(f"{name}: a {trigger.get('type')} trigger, not postgresql")
        if not all(isinstance(value, str) for value in meta.values()):
            problems.append(f"{name}: KEDA takes strings only: quote the numbers")
        if meta.get("targetQueryValue") != "1":
            problems.append(f'{name}: targetQueryValue must be "1" (one pod per queued job)')
        if meta.get("activationTargetQueryValue") != "0":
            problems.append(f'{name}: activationTargetQueryValue must be "0" (a job wakes it)')
        if trigger.get("metricType", "AverageValue") != "AverageValue":
            problems.append(f"{name}: metricType must be AverageValue (jobs per pod)")
    return problems


def farm_database(docs: list[dict[str, Any]], deployment: str) -> tuple[str, int, str, str]:
    """(host, port, database, user) of a worker Deployment's SVDFARM_DATABASE_URL."""
    worker = containers(worker_deployments(docs)[deployment])[-1]
    url = urlsplit(container_env(worker, docs)["SVDFARM_DATABASE_URL"])
    return url.hostname or "", url.port or 5432, url.path.strip("/"), url.username or ""


def auth_problems(
    name: str, trigger: dict[str, Any], docs: list[dict[str, Any]], deployment: str
) -> list[str]:
    """Why KEDA could not read the database of ``deployment`` for a ScaledObject's trigger:
    its TriggerAuthentication, the Secret keys that reads, and the connection they make (the
    farm's host, port and database, as a role of KEDA's own, in a URL KEDA's Go driver takes)."""
    ref = trigger.get("authenticationRef", {})
    kind = ref.get("kind", "TriggerAuthentication")
    auth = k8s(docs, kind).get(ref.get("name", ""))
    if auth is None:
        return [f"{name}: its authenticationRef names no {kind} {ref.get('name')!r}"]
    problems = []
    params: dict[str, str] = {}
    for target in auth["spec"].get("secretTargetRef", []):
        parameter, secret = target.get("parameter"), k8s(docs, "Secret").get(target.get("name"))
        if parameter not in POSTGRESQL_AUTH:
            problems.append(f"{name}: {kind} parameter {parameter!r} is none of {POSTGRESQL_AUTH}")
        elif secret is None or target.get("key") not in secret.get("stringData", {}):
            problems.append(f"{name}: {parameter} reads {target.get('key')!r} of no Secret")
        else:
            params[parameter] = str(secret["stringData"][target["key"]])
    meta = trigger.get("metadata", {})
    if "connection" in params:
        url = urlsplit(params["connection"])
        if url.scheme not in {"postgresql", "postgres"}:
            problems.append(f"{name}: connection scheme {url.scheme!r}: KEDA wants postgresql://")
        given = (url.hostname or "", url.port or 5432, url.path.strip("/"), url.username or "")
    else:
        missing = POSTGRESQL_PARTS - set(params) - set(meta)
        if missing or not ({"password", "passwordFromEnv"} & (set(params) | set(meta))):
            problems.append(f"{name}: no connection, and {sorted(missing)} or a password missing")
            return problems
        parts = {**meta, **params}
        given = (parts["host"], int(parts["port"]), parts["dbName"], parts["userName"])
    farm = farm_database(docs, deployment)
    if given[:3] != farm[:3]:
        problems.append(f"{name}: KEDA reads {given[:3]}, the farm's database is {farm[:3]}")
    if given[3] in {"", farm[3]}:
        problems.append(f"{name}: KEDA logs in as {given[3]!r}: give it a read-only role")
    return problems


def scaled_target(scaled: dict[str, Any]) -> str:
    """The Deployment a ScaledObject scales."""
    target: str = scaled["spec"]["scaleTargetRef"]["name"]
    return target


def pool_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What is wrong between the worker Deployments and the ScaledObjects that scale them."""
    problems = []
    pools = {name: consumed(d) for name, d in worker_deployments(docs).items()}
    counted: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    for name, scaled in k8s(docs, "ScaledObject").items():
        target = scaled["spec"]["scaleTargetRef"]
        targets[target["name"]] += 1
        if target.get("kind", "Deployment") != "Deployment" or target["name"] not in pools:
            problems.append(f"ScaledObject {name} targets {target}, not a worker Deployment")
            continue
        problems += scaling_problems(name, scaled)
        for trigger in scaled["spec"].get("triggers", []):
            if trigger.get("type") != "postgresql":
                continue
            try:
                queues = backlog_queues(str(trigger.get("metadata", {}).get("query", "")))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                continue
            twice = sorted(q for q, n in Counter(queues).items() if n > 1)
            if twice:
                problems.append(f"{name}: its query names {twice} more than once")
            counted.update(set(queues))
            for queue in queues:
                if queue not in pools[target["name"]]:
                    problems.append(
                        f"{name}: its query counts {queue!r}, which {target['name']} "
                        "does not consume"
                    )
            problems += auth_problems(name, trigger, docs, target["name"])
    problems += [f"{t} is the target of {n} ScaledObjects" for t, n in targets.items() if n > 1]
    for queue in sorted({q for queues in pools.values() for q in queues}):
        if counted[queue] != 1:
            problems.append(
                f"{queue} is consumed by a pool but counted by {counted[queue]} "
                "ScaledObjects (want 1: a job wakes one pool)"
            )
    return problems


def desired_pods(scaled: dict[str, Any], queued: dict[str, int]) -> int:
    """The pods KEDA asks for when the farm holds ``queued`` jobs (queue: queued rows): the
    query's count over targetQueryValue, rounded up (AverageValue), within the replica bounds;
    minReplicaCount while the count is at or below activationTargetQueryValue."""
    spec = scaled["spec"]
    meta = backlog_trigger(scaled)["metadata"]
    count = sum(queued.get(queue, 0) for queue in backlog_queues(meta["query"]))
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if count <= float(meta.get("activationTargetQueryValue", "0")):
        return int(low)
    return int(max(low, min(high, math.ceil(count / float(meta["targetQueryValue"])))))


# ---- every file ----------------------------------------------------------------------------


def test_every_file_parses() -> None:
    """Compose, each Kubernetes document, each unit and each Dockerfile parse."""
    assert set(compose()["services"]) and k8s_docs() and units() and dockerfiles()
    for doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name")
    for path in units():
        unit = read_unit(path)
        assert unit.has_section("Unit") and unit.has_section("Service"), path.name
    for path in dockerfiles():
        assert dockerfile(path)[0][0] in {"ARG", "FROM"}, path.name
    known = {COMPOSE, *dockerfiles(), *units(), *(DEPLOY / "k8s").glob("*.yaml")}
    others = {p for p in deploy_files() if p.suffix not in {".md", ".dockerignore"}} - known
    assert not others, f"files no test reads: {sorted(map(str, others))}"


def test_svdfarm_commands_parse() -> None:
    """Every ``svdfarm ...`` command in deploy/ is a real subcommand whose flags parse."""
    found = [
        (where, args) for where, argv in all_commands() if (args := svdfarm_args(argv)) is not None
    ]
    assert len(found) >= 12, found
    problems = [f"{where}: {p}" for where, args in found if (p := command_problem(args))]
    assert not problems, "\n".join(problems)


def test_celery_commands_use_the_svdfarm_app() -> None:
    """``celery`` commands (Flower) load the svdfarm app."""
    celery = [(w, argv) for w, argv in all_commands() if argv and argv[0].endswith("celery")]
    assert celery
    for where, argv in celery:
        assert argv[1:3] == ["-A", "svdfarm"] and argv[3] in {"flower", "worker"}, where


def test_each_way_runs_web_worker_and_migration() -> None:
    """Compose, Kubernetes and systemd each run the web, a worker and the migration."""
    for where in ("compose", "Deployment", "svdfarm-"):
        assert {"web", "worker"} <= roles(where), where
    for where in ("compose", "Job", "svdfarm-migrate"):
        assert "migrate" in roles(where), where


def test_queue_names_are_the_codes() -> None:
    """Every queue-like name in deploy/ parses with parse_queue and is in all_queues()."""
    texts = {p: p.read_text() for p in deploy_files()}
    problems = [f"{p.name}: {q}" for p, text in texts.items() for q in queue_problems(text)]
    assert not problems, "\n".join(problems)
    assert sum(len(QUEUE_LIKE.findall(text)) for text in texts.values()) > 20


def test_settings_exist() -> None:
    """Every SVDFARM_* variable in deploy/ is one svdfarm reads."""
    known = known_settings()
    assert {"SVDFARM_DATABASE_URL", "SVDFARM_STOP_TIMEOUT", "SVDFARM_ALLOW_CPU"} <= known
    problems = [
        f"{p.name}: {problem}"
        for p in deploy_files()
        for problem in setting_problems(p.read_text(), known)
    ]
    assert not problems, "\n".join(problems)


# ---- compose -------------------------------------------------------------------------------


def test_compose_services() -> None:
    """Compose runs web, worker, redis, postgres and migrate; Flower on request, with flower."""
    services = compose()["services"]
    assert {"web", "worker", "redis", "postgres", "migrate", "flower"} <= set(services)
    assert "flower" in services["flower"].get("profiles", [])
    optional = {
        "flower": ["flower"],
        "minio": ["s3"],
        "minio-bucket": ["s3"],
        "rabbitmq": ["rabbitmq"],
    }
    assert {name: s["profiles"] for name, s in services.items() if s.get("profiles")} == optional
    # Flower runs in the web image, so that image must have it.
    installs = pip_installs(dockerfile(DEPLOY / "Dockerfile.web"))
    names = {
        canonicalize_name(Requirement(r).name)
        for _, rs in installs
        for r in rs
        if not is_project(r)
    }
    assert "flower" in names


def test_compose_worker_reserves_the_gpus() -> None:
    """Only the worker reserves NVIDIA GPUs."""
    for name, service in compose()["services"].items():
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        gpus = [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]
        assert bool(gpus) == (name == "worker"), name
        assert all(d.get("driver") == "nvidia" for d in gpus)


def test_compose_migration_runs_once_before_web_and_worker() -> None:
    """migrate is one-shot after PostgreSQL is healthy; web and worker wait for its success."""
    services = compose()["services"]
    migrate = services["migrate"]
    assert svdfarm_args(migrate["command"]) == ["db", "upgrade"]
    assert migrate.get("restart", "no") == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_compose_images_web_health_and_shared_data() -> None:
    """Images come from the two Dockerfiles, the web is health-checked, /data is shared."""
    services = compose()["services"]
    for name, dockerfile_name in {
        "web": "Dockerfile.web",
        "migrate": "Dockerfile.web",
        "flower": "Dockerfile.web",
        "worker": "Dockerfile.worker",
    }.items():
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / dockerfile_name
        ), name
    assert any("/healthz" in part for part in services["web"]["healthcheck"]["test"])
    data_dir = compose_env(services["web"])["SVDFARM_DATA_DIR"]
    mounts = {
        name: {v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == data_dir}
        for name in ("web", "worker")
    }
    assert mounts["web"] and mounts["web"] == mounts["worker"] <= set(compose()["volumes"])


STORAGE_ENV = {
    "SVDFARM_STORAGE_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}


def test_compose_s3_profile_runs_minio_without_a_default_password() -> None:
    """``--profile s3`` adds MinIO and a one-shot that makes the bucket; no password has a
    default; web and worker read the store and its credentials from the environment."""
    services = compose()["services"]
    minio, bucket = services["minio"], services["minio-bucket"]
    assert minio["image"].startswith("minio/minio") and bucket["image"].startswith("minio/mc")
    for service in (minio, bucket):
        given = compose_env(service)["MINIO_ROOT_PASSWORD"]
        assert re.fullmatch(r"\$\{MINIO_ROOT_PASSWORD:\?[^}]+\}", given), given
    assert re.fullmatch(r"\$\{AWS_SECRET_ACCESS_KEY:\?[^}]+\}", compose_env(bucket)["FARM_SECRET"])
    assert "mc mb --ignore-existing" in " ".join(bucket["command"])
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert all(not str(port).startswith("9") for port in minio.get("ports", []))
    for name in ("web", "worker"):
        env = compose_env(services[name])
        assert {key: env.get(key) for key in STORAGE_ENV if key != "AWS_DEFAULT_REGION"} == {
            key: f"${{{key}:-}}" for key in STORAGE_ENV if key != "AWS_DEFAULT_REGION"
        }, name
        needs = services[name]["depends_on"]["minio-bucket"]
        assert needs == {"condition": "service_completed_successfully", "required": False}


def test_compose_rabbitmq_profile_sets_the_consumer_timeout_from_the_time_limit() -> None:
    """``--profile rabbitmq`` runs RabbitMQ with its management plugin and no default
    password; its consumer timeout is the farm's hard time limit plus an hour (computed by the
    shell from the same variable the farm reads); web and worker wait for it when it runs."""
    services = compose()["services"]
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:") and rabbit["image"].endswith("-management")
    env = compose_env(rabbit)
    assert re.fullmatch(r"\$\{RABBITMQ_PASSWORD:\?[^}]+\}", env["RABBITMQ_DEFAULT_PASS"])
    limit = "${SVDFARM_TASK_TIME_LIMIT:-11100}"
    assert env["SVDFARM_TASK_TIME_LIMIT"] == limit
    assert compose_env(services["worker"])["SVDFARM_TASK_TIME_LIMIT"] == limit
    script = " ".join(rabbit["command"])
    assert "consumer_timeout = $$(( ($$SVDFARM_TASK_TIME_LIMIT + 3600) * 1000 ))" in script
    # What the shell writes, with the default limit (compose turns $$ into $).
    shell = script.replace("$$", "$").split(" > ")[0].removeprefix("echo ")
    written = subprocess.run(
        ["sh", "-c", f"echo {shell}"],
        env={"SVDFARM_TASK_TIME_LIMIT": str(load_settings({}).task_time_limit_s)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert written == f"consumer_timeout = {(load_settings({}).task_time_limit_s + 3600) * 1000}"
    assert all(not str(port).startswith("15672") for port in rabbit.get("ports", []))
    for name in ("web", "worker"):
        needs = services[name]["depends_on"]["rabbitmq"]
        assert needs == {"condition": "service_healthy", "required": False}


def test_k8s_web_and_workers_read_the_same_storage_secret() -> None:
    """The web and every worker pool take the store's URL and credentials from one Secret,
    whose example values keep the shared folder (an empty URL)."""
    docs = k8s_docs()
    deployments = k8s(docs, "Deployment").values()
    web = [d for d in deployments if runs(d, "web")]
    workers = list(worker_deployments(docs).values())
    assert web and workers
    sources = set()
    for deployment in [*web, *workers]:
        container = containers(deployment)[-1]
        refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        holding = {
            name for name in refs if STORAGE_ENV <= set(k8s(docs, "Secret")[name]["stringData"])
        }
        assert len(holding) == 1, deployment["metadata"]["name"]
        sources |= holding
        assert STORAGE_ENV <= set(container_env(container, docs))
    (name,) = sources
    assert k8s(docs, "Secret")[name]["stringData"]["SVDFARM_STORAGE_URL"] == ""


# ---- Kubernetes ----------------------------------------------------------------------------


def test_k8s_references_resolve() -> None:
    """Namespaces agree; ConfigMaps, Secrets, claims and selectors point at what exists."""
    docs = k8s_docs()
    namespace = next(iter(k8s(docs, "Namespace")))
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
    claims = k8s(docs, "PersistentVolumeClaim")
    for doc in docs:
        if "template" not in doc.get("spec", {}):
            continue
        name = doc["metadata"]["name"]
        for c in containers(doc):
            container_env(c, docs)  # a missing ConfigMap or Secret is a KeyError
        for volume in pod_spec(doc).get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        selector = doc["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), name
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]


def test_k8s_web_service_and_migration() -> None:
    """The Service reaches the web pods' port, readiness is /healthz, the Job migrates."""
    docs = k8s_docs()
    web = next(d for d in k8s(docs, "Deployment").values() if runs(d, "web"))
    container = containers(web)[-1]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p.get("name") for p in container["ports"]} | {
        p["containerPort"] for p in container["ports"]
    }
    labels = web["spec"]["template"]["metadata"]["labels"]
    services = [
        s for s in k8s(docs, "Service").values() if s["spec"]["selector"].items() <= labels.items()
    ]
    assert services and all(p["targetPort"] in ports for s in services for p in s["spec"]["ports"])
    jobs = [j for j in k8s(docs, "Job").values() if runs(j, "db", "upgrade")]
    assert jobs and pod_spec(jobs[0])["restartPolicy"] in {"Never", "OnFailure"}


def test_k8s_worker_pools() -> None:
    """Each pool: one GPU per pod, a known GPU product, its class label, the shared /data."""
    docs = k8s_docs()
    pools = worker_deployments(docs)
    assert len(pools) >= 2
    data_claims = set()
    for name, deployment in pools.items():
        container = containers(deployment)[-1]
        for part in ("requests", "limits"):
            assert str(container["resources"][part]["nvidia.com/gpu"]) == "1", (name, part)
        queues = consumed(deployment)
        label = deployment["spec"]["template"]["metadata"]["labels"].get(CLASS_LABEL)
        assert label == best_class(queues), f"{name}: {CLASS_LABEL}={label}, serves {queues}"
        data_dir = container_env(container, docs)["SVDFARM_DATA_DIR"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data_dir)
        volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
        data_claims.add(volume["persistentVolumeClaim"]["claimName"])
    assert len(data_claims) == 1, f"the pools write videos to different volumes: {data_claims}"


def test_k8s_scaled_objects_count_what_their_pools_consume() -> None:
    """Each ScaledObject targets a pool and counts its queued jobs with one PostgreSQL query
    over the queues that pool consumes; each queue wakes exactly one pool."""
    docs = k8s_docs()
    problems = pool_problems(docs)
    assert not problems, "\n".join(problems)
    assert len(k8s(docs, "ScaledObject")) == len(worker_deployments(docs)) >= 2


def test_k8s_backlog_query_reads_the_job_model() -> None:
    """The query's table, columns and state are the model's: ``queued`` is the state of a job
    that waits in the database and of one sent and not yet taken (dispatch.waiting() is the
    first of them only), and both count."""
    assert Job.__tablename__ == "jobs"
    assert {"state", "queue", "published_at"} <= set(Job.__table__.columns.keys())
    assert JobState.QUEUED.value == "queued"
    waiting = str(dispatch.waiting().compile(compile_kwargs={"literal_binds": True}))
    assert "jobs.state = 'queued'" in waiting and "published_at IS NULL" in waiting


def test_k8s_keda_reads_the_database_with_a_role_of_its_own() -> None:
    """Every trigger authenticates through a TriggerAuthentication whose Secret holds a
    ``postgresql://`` connection to the farm's host, port and database as another user."""
    docs = k8s_docs()
    auths = k8s(docs, "TriggerAuthentication")
    for name, scaled in k8s(docs, "ScaledObject").items():
        trigger = backlog_trigger(scaled)
        assert trigger["authenticationRef"]["name"] in auths, name
        problems = auth_problems(name, trigger, docs, scaled_target(scaled))
        assert not problems, "\n".join(problems)
    assert "svdfarm-redis" not in auths, "nothing reads Redis for KEDA any more"


def test_k8s_pools_scale_one_pod_per_queued_job() -> None:
    """A job in each of three queues of one pool asks for three pods; two and two, four; no
    job, or jobs only in queues the pool does not count, none; a flood, maxReplicaCount."""
    scaled_objects = k8s(k8s_docs(), "ScaledObject")
    for name, scaled in scaled_objects.items():
        spec = scaled["spec"]
        queues = backlog_queues(backlog_trigger(scaled)["metadata"]["query"])
        assert len(queues) >= 3 and spec["maxReplicaCount"] >= 4, name
        assert desired_pods(scaled, {q: 1 for q in queues[:3]}) == 3, name
        assert desired_pods(scaled, {q: 2 for q in queues[:2]}) == 4, name
        assert desired_pods(scaled, {}) == spec.get("minReplicaCount", 0) == 0, name
        others = [q for q in all_queues(MODEL_KEYS) if q not in queues]
        assert desired_pods(scaled, {q: 5 for q in others}) == 0, name
        assert desired_pods(scaled, {queues[-1]: 1000}) == spec["maxReplicaCount"], name
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert behavior["stabilizationWindowSeconds"] >= 1800, f"{name} scales down fast"


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_k8s_backlog_queries_count_queued_jobs_on_postgresql(database_url: str) -> None:
    """Each ScaledObject's query, run as written on a migrated PostgreSQL by a role that may
    only read ``jobs``, counts its pool's queued jobs, waiting in the database or sent and not
    yet taken; not running, ended or canceling ones, nor those of other pools' queues."""
    upgrade(database_url)
    scaled_objects = k8s(k8s_docs(), "ScaledObject")
    queries = {name: backlog_trigger(s)["metadata"]["query"] for name, s in scaled_objects.items()}
    counted = {q for query in queries.values() for q in backlog_queues(query)}
    uncounted = next(q for q in all_queues() if q not in counted)
    now = utcnow()
    rows = [job_row(uuid.uuid4(), queue=uncounted, published_at=None)]
    expected: dict[str, int] = {}
    queued: Counter[str] = Counter({uncounted: 1})
    for index, (name, query) in enumerate(queries.items()):
        first, *_, last = backlog_queues(query)
        # A different count per pool, so a query that counted another pool's jobs would fail.
        rows += [job_row(uuid.uuid4(), queue=first, published_at=None) for _ in range(index + 2)]
        rows.append(job_row(uuid.uuid4(), queue=last, published_at=now))
        queued.update({first: index + 2, last: 1})
        expected[name] = index + 3
        for state in set(JobState) - {JobState.QUEUED}:
            rows.append(job_row(uuid.uuid4(), queue=first, state=state, started_at=now))
    db = Database(database_url)
    engine = sqlalchemy.create_engine(database_url)
    role = f"keda_{uuid.uuid4().hex[:12]}"
    created = False
    try:
        with db.begin() as session:
            session.add_all(rows)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE ROLE "{role}" NOLOGIN'))
            created = True
            schema = conn.scalar(sqlalchemy.text("SELECT current_schema()"))
            # The README's role: SELECT on jobs (and USAGE on a schema that is not public).
            conn.execute(sqlalchemy.text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            conn.execute(sqlalchemy.text(f'GRANT SELECT ON jobs TO "{role}"'))
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'SET LOCAL ROLE "{role}"'))
            got = {name: conn.scalar(sqlalchemy.text(query)) for name, query in queries.items()}
        assert got == expected
        for name, scaled in scaled_objects.items():
            high = scaled["spec"]["maxReplicaCount"]
            assert desired_pods(scaled, dict(queued)) == min(high, expected[name]), name
    finally:
        if created:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(f'DROP OWNED BY "{role}"'))
                conn.execute(sqlalchemy.text(f'DROP ROLE "{role}"'))
        engine.dispose()
        db.dispose()


# ---- systemd -------------------------------------------------------------------------------


def test_systemd_units() -> None:
    """Web, worker and a one-shot migration; the web requires it; nobody runs as root."""
    by_name = {p.name: p for p in units()}
    assert {"svdfarm-web.service", "svdfarm-worker@.service", "svdfarm-migrate.service"} <= set(
        by_name
    )
    for path in units():
        service = read_unit(path)["Service"]
        assert service.get("User") not in {None, "root", "0"}, path.name
    migrate = read_unit(by_name["svdfarm-migrate.service"])["Service"]
    assert migrate["Type"] == "oneshot"
    web = read_unit(by_name["svdfarm-web.service"])["Unit"]
    assert "svdfarm-migrate.service" in web["Requires"].split()
    assert "svdfarm-migrate.service" in web["After"].split()
    worker = read_unit(by_name["svdfarm-worker@.service"])["Service"]
    assert worker["KillMode"] == "mixed", "SIGTERM must reach Celery's main process only"
    assert worker.get("KillSignal", "SIGTERM") == "SIGTERM"


def systemd_word(word: str, env: dict[str, str]) -> str:
    """A word of an Exec line as systemd hands it over: ``$$`` is a ``$``, ``${NAME}`` and
    ``$NAME`` the variable's value (empty when unset)."""
    return re.sub(
        r"\$\$|\$\{(\w+)\}|\$(\w+)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1) or m.group(2), ""),
        word,
    )


def start_checks(path: Path, env: dict[str, str], cwd: Path) -> list[str]:
    """Run a unit's ExecStartPre commands in order as systemd would, with ``env``: the stderr
    of the first one that fails (which stops the start), or an empty list when all pass."""
    for value in unit_values(path, "ExecStartPre"):
        argv = [systemd_word(w, env) for w in shlex.split(value.lstrip("-@+!:"))]
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0 and not value.startswith("-"):
            return [done.stderr]
    return []


@pytest.mark.parametrize(
    "auth",
    ["", "admin", "admin:", ":s3cret"],
)
def test_flower_never_starts_without_a_password(auth: str, tmp_path: Path) -> None:
    """Flower can revoke jobs and stop workers. The systemd unit's start check fails (so
    systemd does not start it) without ``FLOWER_BASIC_AUTH=user:password``, saying what to
    set; compose refuses to start without ``FLOWER_PASSWORD``."""
    unit = DEPLOY / "systemd" / "svdfarm-flower.service"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth
    failed = start_checks(unit, env, tmp_path)
    assert failed and "FLOWER_BASIC_AUTH=user:password" in failed[0]
    flower = compose()["services"]["flower"]
    given = compose_env(flower)["FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"[^:$]+:\$\{FLOWER_PASSWORD:\?[^}]+\}", given), given


def test_flower_starts_with_a_password_on_localhost_only(tmp_path: Path) -> None:
    """With ``user:password`` set the check passes, and the password reaches it through the
    environment only (quotes and ``$(...)`` in it are not run); Flower listens on localhost."""
    unit = DEPLOY / "systemd" / "svdfarm-flower.service"
    password = 'it\'s a "$(touch pwned)" `touch pwned`'
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FLOWER_BASIC_AUTH": f"ops:{password}"}
    assert start_checks(unit, env, tmp_path) == []
    assert not (tmp_path / "pwned").exists()
    assert not [v for v in unit_values(unit, "ExecStartPre") if v.startswith("-")]
    (start,) = [shlex.split(v) for v in unit_values(unit, "ExecStart")]
    assert start[1:4] == ["-A", "svdfarm", "flower"] and "--address=127.0.0.1" in start
    ports = compose()["services"]["flower"]["ports"]
    assert all(str(port).startswith("127.0.0.1:") for port in ports), ports


# ---- grace periods -------------------------------------------------------------------------


def test_grace_periods_outlast_the_stop_timeout() -> None:
    """Compose, Kubernetes and systemd let a stopped worker finish or requeue its job."""
    graces: dict[str, tuple[float, int]] = {}
    services = compose()["services"]
    worker = services["worker"]
    graces["compose worker"] = (
        seconds(worker.get("stop_grace_period", 10)),
        stop_timeout(compose_env(worker)),
    )
    docs = k8s_docs()
    for name, deployment in worker_deployments(docs).items():
        env = container_env(containers(deployment)[-1], docs)
        grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        graces[name] = (seconds(grace), stop_timeout(env))
    for path in units():
        execs = [shlex.split(value) for value in unit_values(path, "ExecStart")]
        if any((svdfarm_args(argv) or [""])[0] == "worker" for argv in execs):
            env = dict(
                v.split("=", 1)
                for line in unit_values(path, "Environment")
                for v in shlex.split(line)
            )
            timeout = read_unit(path)["Service"].get("TimeoutStopSec", "90")
            graces[path.name] = (seconds(timeout), stop_timeout(env))
    assert len(graces) >= 4
    short = {k: v for k, v in graces.items() if v[0] < v[1] + GRACE_MARGIN_S}
    assert not short, f"(grace s, SVDFARM_STOP_TIMEOUT s) too close: {short}"


# ---- images --------------------------------------------------------------------------------


def is_project(requirement: str) -> bool:
    """True for the project itself in a ``pip install`` line: ``.`` or ``.[extras]``."""
    return requirement == "." or requirement.startswith(".[")


def web_dependencies() -> list[Requirement]:
    """What ``pip install '.[web]'`` asks for: the core's dependencies and the web extra."""
    extras = PROJECT["optional-dependencies"]
    return [Requirement(r) for r in PROJECT["dependencies"] + extras["web"]]


def test_dockerfile_web_installs_no_torch() -> None:
    """The web image: the project without its deps, the web's deps by hand, no torch."""
    instructions = dockerfile(DEPLOY / "Dockerfile.web")
    installs = pip_installs(instructions)
    given = [Requirement(r) for _, rs in installs for r in rs if not is_project(r)]
    names = {canonicalize_name(r.name) for r in given}
    assert not names & TORCH_FAMILY, names & TORCH_FAMILY
    assert not any("download.pytorch.org" in o for opts, _ in installs for o in opts)
    assert all("--no-deps" in opts for opts, rs in installs if "." in rs)
    assert any("." in rs for _, rs in installs), "the project itself is not installed"
    for need in web_dependencies():
        have = [r for r in given if canonicalize_name(r.name) == canonicalize_name(need.name)]
        assert have and need.extras <= have[0].extras, f"Dockerfile.web lacks {need}"
    user = [rest for kw, rest in instructions if kw == "USER"]
    assert user and user[-1] not in {"root", "0"}


def test_dockerfile_worker_installs_cuda_torch() -> None:
    """The worker image: a CUDA base, torch from a CUDA wheel index, then the project."""
    instructions = dockerfile(DEPLOY / "Dockerfile.worker")
    base = next(rest for kw, rest in instructions if kw == "FROM").split()[0]
    assert base.startswith("nvidia/cuda:") or (
        base.startswith("pytorch/pytorch:") and "cuda" in base
    ), base
    installs = pip_installs(instructions)
    names = [
        [canonicalize_name(Requirement(r).name) for r in rs if not is_project(r)]
        for _, rs in installs
    ]
    torch_at = next(i for i, n in enumerate(names) if "torch" in n)
    options = installs[torch_at][0]
    index = options[options.index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    project_at = next(i for i, (_, rs) in enumerate(installs) if any(map(is_project, rs)))
    assert torch_at < project_at and "--no-deps" not in installs[project_at][0]
    assert ".[worker]" in installs[project_at][1], "the worker image needs the worker extra"
    user = [rest for kw, rest in instructions if kw == "USER"]
    assert user and user[-1] not in {"root", "0"}


NO_WORKER_DEPS = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the web image)")
sys.meta_path.insert(0, Missing())
import cli, svdfarm.celery_app
from svdfarm import db
db.upgrade(sys.argv[1])
from web import create_app
client = create_app().test_client()
for path in ("/healthz", "/"):
    assert client.get(path).status_code == 200, path
"""


def test_web_side_runs_without_worker_dependencies(tmp_path: Path) -> None:
    """What the web image runs (migrate, the web app) works with none of WORKER_ONLY."""
    blocked = {name.replace("-", "_") for name in WORKER_ONLY}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVDFARM_")}
    url = f"sqlite:///{tmp_path / 'web.db'}"
    env.update(SVDFARM_DATA_DIR=str(tmp_path), SVDFARM_DATABASE_URL=url, SVDFARM_SECRET_KEY="x")
    done = subprocess.run(
        [sys.executable, "-c", NO_WORKER_DEPS.format(blocked=sorted(blocked)), url],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


# ---- the checks themselves -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "svd.cuda.bf16.80gb",
        "svd.cuda.bf17.80g",
        "svd.cuda.bf16.81g",
        "svd.gpu.fp16.24g",
        "svd.cuda.fp16",
    ],
)
def test_a_wrong_queue_name_is_caught(bad: str) -> None:
    """A misspelt queue name in a file is reported."""
    assert queue_problems(f"AND queue IN ('{bad}')\n")


def test_wrong_commands_and_settings_are_caught() -> None:
    """An unknown flag, subcommand or setting is reported."""
    assert command_problem(["worker", "--queues-from", "svd.cuda.fp16.24g"])
    assert command_problem(["serve"])
    assert command_problem(["worker", "--gpu", "all"])
    assert setting_problems("SVDFARM_STOP_TIMEOUTS=600", known_settings())
    assert seconds("11m") == seconds("660s") == seconds("11min") == 660


def with_queues(query: str, queues: list[str]) -> str:
    """``query`` counting ``queues`` instead of its own."""
    head = query[: query.index("(", query.index("IN"))]
    return head + "(" + ", ".join(f"'{q}'" for q in queues) + ")"


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM jobs WHERE state = 'running' AND queue IN ('svd.cuda.fp16.8g')",
        "SELECT count(*) FROM job WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g')",
        "SELECT count(*) FROM jobs WHERE state = 'queued' OR queue IN ('svd.cuda.fp16.8g')",
        "SELECT count(*) FROM jobs WHERE queue IN ('svd.cuda.fp16.8g')",
        "SELECT count(id) FROM jobs WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g')",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g');",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue = 'svd.cuda.fp16.8g'",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ()",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g',)",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN (svd.cuda.fp16.8g)",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g' "
        "'svd.cuda.fp16.12g')",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue IN ('svd.cuda.fp16.8g') "
        "AND priority > 0",
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND queue LIKE 'svd.cuda.%'",
    ],
)
def test_a_backlog_query_of_another_shape_is_rejected(query: str) -> None:
    """The parser takes the one shape of query the pools scale on, and nothing else."""
    with pytest.raises(ValueError):
        backlog_queues(query)


def test_a_backlog_query_may_be_folded() -> None:
    """Line breaks and spaces (YAML's folding) do not change the queues read."""
    query = (
        "SELECT  count(*)\nFROM jobs WHERE state = 'queued' AND queue IN (\n"
        "'svd.cuda.fp16.8g',\n  'svd.cuda.fp32.8g' )\n"
    )
    assert backlog_queues(query) == ["svd.cuda.fp16.8g", "svd.cuda.fp32.8g"]


def test_a_pool_missing_a_queue_or_counting_a_foreign_one_is_caught() -> None:
    """A query that leaves out a queue of its pool (then nobody wakes for it), counts a queue
    its pool does not consume, names a queue twice or has another shape: each is reported."""
    docs = k8s_docs()
    name, scaled = next(iter(k8s(docs, "ScaledObject").items()))
    meta = backlog_trigger(scaled)["metadata"]
    queues = backlog_queues(meta["query"])
    pool = worker_deployments(docs)[scaled_target(scaled)]
    served = set(queues_for(GPU_PROFILES[pod_spec(pool)["nodeSelector"][GPU_PRODUCT]]))
    foreign = next(q for q in all_queues() if q.startswith("svd.cuda.") and q not in served)

    def problems_with(query: str) -> list[str]:
        changed = copy.deepcopy(docs)
        backlog_trigger(k8s(changed, "ScaledObject")[name])["metadata"]["query"] = query
        return pool_problems(changed)

    missing = problems_with(with_queues(meta["query"], queues[1:]))
    assert any(f"{queues[0]} is consumed by a pool but counted by 0" in p for p in missing)
    extra = problems_with(with_queues(meta["query"], [*queues, foreign]))
    assert any(f"counts {foreign!r}" in p for p in extra), extra
    twice = problems_with(with_queues(meta["query"], [*queues, queues[0]]))
    assert any("more than once" in p for p in twice), twice
    running = problems_with(meta["query"].replace("'queued'", "'running'"))
    assert any("is not SELECT count(*)" in p for p in running), running
    assert not problems_with(with_queues(meta["query"], queues[::-1]))


def test_a_pool_scaling_on_many_triggers_or_a_formula_is_caught() -> None:
    """A second trigger, a scalingModifiers formula left over, an unquoted number, a target
    other than one job per pod, or a trigger of another scaler: each is reported."""
    docs = k8s_docs()
    name, scaled = next(iter(k8s(docs, "ScaledObject").items()))
    assert not scaling_problems(name, scaled)
    doubled = copy.deepcopy(scaled)
    doubled["spec"]["triggers"].append(copy.deepcopy(backlog_trigger(scaled)))
    assert any("2 triggers, not 1" in p for p in scaling_problems(name, doubled))
    formula = copy.deepcopy(scaled)
    formula["spec"]["advanced"]["scalingModifiers"] = {"formula": "backlog", "target": "1"}
    assert any("scalingModifiers left over" in p for p in scaling_problems(name, formula))
    unquoted = copy.deepcopy(scaled)
    backlog_trigger(unquoted)["metadata"]["targetQueryValue"] = 1
    assert any("strings only" in p for p in scaling_problems(name, unquoted))
    halved = copy.deepcopy(scaled)
    backlog_trigger(halved)["metadata"]["targetQueryValue"] = "2"
    assert any("one pod per queued job" in p for p in scaling_problems(name, halved))
    first = backlog_queues(backlog_trigger(scaled)["metadata"]["query"])[0]
    assert desired_pods(halved, {first: 3}) == 2, "three jobs, two per pod: two pods"
    redis = copy.deepcopy(scaled)
    backlog_trigger(redis)["type"] = "redis"
    assert any("a redis trigger" in p for p in scaling_problems(name, redis))


def test_a_wrong_keda_auth_is_caught() -> None:
    """A trigger naming no TriggerAuthentication, a Secret key that is not there, SQLAlchemy's
    URL where KEDA wants its own, another database, or the farm's own user: each is reported."""
    docs = k8s_docs()
    name, scaled = next(iter(k8s(docs, "ScaledObject").items()))
    deployment = scaled_target(scaled)
    auth_name = backlog_trigger(scaled)["authenticationRef"]["name"]
    auth = k8s(docs, "TriggerAuthentication")[auth_name]
    secret_name = auth["spec"]["secretTargetRef"][0]["name"]
    connection = k8s(docs, "Secret")[secret_name]["stringData"]["connection"]

    def problems_with(
        ref: str = auth_name, key: str = "connection", url: str = connection
    ) -> list[str]:
        changed = copy.deepcopy(docs)
        trigger = backlog_trigger(k8s(changed, "ScaledObject")[name])
        trigger["authenticationRef"]["name"] = ref
        k8s(changed, "TriggerAuthentication")[auth_name]["spec"]["secretTargetRef"][0]["key"] = key
        k8s(changed, "Secret")[secret_name]["stringData"]["connection"] = url
        return auth_problems(name, trigger, changed, deployment) + pool_problems(changed)

    assert not problems_with()
    assert any("names no TriggerAuthentication" in p for p in problems_with(ref="svdfarm-redis"))
    assert any("of no Secret" in p for p in problems_with(key="url"))
    sqlalchemy_url = connection.replace("postgresql://", "postgresql+psycopg://")
    assert any("wants postgresql://" in p for p in problems_with(url=sqlalchemy_url))
    other_db = connection.replace("/svdfarm?", "/postgres?")
    assert other_db != connection
    assert any("the farm's database is" in p for p in problems_with(url=other_db))
    farm_user = farm_database(docs, deployment)[3]
    as_farm = connection.replace("//keda:", f"//{farm_user}:")
    assert as_farm != connection
    assert any("a read-only role" in p for p in problems_with(url=as_farm))
