"""MLflow in a process of its own: a Tracker (runner.tracking) run in a child process, called from the launch.

Importing MLflow and opening its store cost seconds of CPU (about 4 s on a 2-core machine). On a thread of the
training process they hold the GIL against training's own start-up (importing torch) and each epoch's Python
work, so a short run ended ~3 s later than the same script written by hand. In a child process they run on
another core: the child is started before the launch imports torch (``prestart``, from ``runner.__main__``), and
by the time the first epoch is checkpointed MLflow is ready there.

``TrackerProcess`` offers the Tracker's methods; each call is sent to the child and waited for, in order, from the
persist thread (runner.persist), so everything the launch relies on holds as before: an epoch is logged once its
checkpoint is written, a failure (a lost server) is raised on the persist thread, the run is FINISHED or KILLED
before the launch ends. The child ignores stop signals (the launch decides what a stop does and tells it) and
leaves when the launch closes it or dies (its end of the socket closes): calls are answered before the launch
goes on, so a child leaving loses nothing the launch believed logged.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

from runner.tracking import LAUNCH_PID_ENV

log = logging.getLogger(__name__)

WARM_MODEL_LOGGING = "--warm-model-logging"
_STATE = ("uri", "experiment", "experiment_id", "run_id", "resumed", "logged_epochs")
_prestarted: _Child | None = None  # started by runner.__main__ before torch is imported; taken by a TrackerProcess


class TrackingProcessLost(RuntimeError):
    """The MLflow process ended without answering (killed, or out of memory)."""


class TrackingFailed(RuntimeError):
    """An error raised in the MLflow process, by a library the launch does not import: its message, as it was."""


class _Child:
    """The child process and the launch's end of the socket to it."""

    def __init__(self, warm_model_logging: bool = False) -> None:
        self.warm_model_logging = warm_model_logging
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "runner.tracking_process", str(theirs.fileno())]
        command += [WARM_MODEL_LOGGING] if warm_model_logging else []
        env = os.environ | {LAUNCH_PID_ENV: str(os.getpid())}
        # stdout: the launch's stderr, as its logging; stdout is kept for what the user asked for
        self.process = subprocess.Popen(
            command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=2, env=env, start_new_session=True
        )  # a session of its own: a Ctrl-C in the terminal reaches only the launch, which decides what it does
        theirs.close()
        self.connection = Connection(ours.detach())

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to leave, and wait for it (killed after ``timeout`` seconds)."""
        try:
            self.connection.send(("__close__", (), {}, None))
            self.connection.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.connection.close()
        self.process.kill()
        self.process.wait()


def prestart(warm_model_logging: bool = False) -> None:
    """Start the MLflow process now, so that it imports MLflow while this process imports torch, and then, with
    ``warm_model_logging`` (``tracking.log_model``), what logging the model at the end needs, while training runs.
    Left unused (the launch found the run finished, or refused its config), it is killed at exit.

    Not for one of several processes of a DDP run (torchrun's, or a SLURM job's tasks): their ranks already share
    the machine's cores, and rank 0 must be as quick as the others to say a config error in one line before
    torchrun stops it for the others' exit. There MLflow stays on rank 0's persist thread."""
    global _prestarted
    processes = [os.environ.get(name, "1") for name in ("WORLD_SIZE", "SLURM_NTASKS")]
    if _prestarted is not None or any(count != "1" for count in processes):
        return
    try:
        _prestarted = _Child(warm_model_logging)
    except OSError as err:  # no process to be had (limits, no fd 2): MLflow stays on the persist thread
        log.debug(f"MLflow stays in this process: {err}")
        return
    atexit.register(_kill_unused)


def _kill_unused() -> None:
    global _prestarted
    if _prestarted is not None:
        child, _prestarted = _prestarted, None
        child.kill()


def prestarted() -> bool:
    """Whether ``prestart`` left a process for this launch: only a single run where the runner owns the process
    (``python -m runner``, not a sweep's job, not a DDP rank). Called from Python (``runner.run``), MLflow is used
    in the caller's process, where it may be imported already and a process of its own would start cold each run."""
    return _prestarted is not None


def _take_prestarted() -> _Child:
    global _prestarted
    child, _prestarted = _prestarted, None
    if child is None:
        return _Child()
    if child.process.poll() is not None:  # it died before the run took it: a fresh one, warmed up as asked
        child.connection.close()
        return _Child(child.warm_model_logging)
    return child


def _how_it_ended(child: _Child) -> str:
    try:
        code = child.process.wait(timeout=2)  # its end of the socket closed: its exit code follows
    except subprocess.TimeoutExpired:
        return "no answer"
    return f"exit code {code}" if code >= 0 else f"signal {-code}"


class TrackerProcess:
    """runner.tracking.Tracker's methods, run in the MLflow process; its state (run id, experiment) mirrored here
    after each call."""

    def __init__(self, uri: str | None, experiment: str, wait_s: float = 30.0):
        self.uri, self.experiment = uri, experiment
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.resumed = False
        self.logged_epochs = 0
        self._child = _take_prestarted()
        # sent with the first call (the child may still be importing MLflow), with where this process imports
        # from: the child unpickles the model, whose class may live in the user's own module
        self._setup: tuple | None = (uri, experiment, wait_s, [os.path.abspath(path) for path in sys.path])

    @property
    def opened(self) -> bool:
        return self.run_id is not None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        child = self._child
        if child is None:
            raise TrackingProcessLost(f"the MLflow process was closed before {name}")
        try:
            kind, content, state = self._exchange(child, (name, args, kwargs, self._setup))
        except (EOFError, OSError) as err:
            raise TrackingProcessLost(f"the MLflow process ended ({_how_it_ended(child)}) during {name}") from err
        except BaseException:  # a second Ctrl-C between the call and its answer: the next answer would be this one's
            self._child = None
            child.kill()
            raise
        self._setup = None
        for key, value in (state or {}).items():  # also after an error: open may have found the store's URI
            setattr(self, key, value)
        if kind == "error":
            raise content  # the child's own error, an OSError included (a full disk): not a lost process
        return content

    @staticmethod
    def _exchange(child: _Child, message: tuple) -> tuple[str, Any, dict | None]:
        """Send one call and read until its answer, writing the child's log lines on the way."""
        child.connection.send(message)
        while True:
            kind, *content = child.connection.recv()
            if kind == "log":
                level, logger, text = content
                logging.getLogger(logger).log(level, text)
                continue
            return kind, content[0], content[1]

    def open(self, run_name: str, run_id: str | None = None, **options: Any) -> TrackerProcess:
        self._call("open", run_name, run_id, **options)
        return self

    def log_pickled_model(self, model, example, registered_model_name: str | None = None) -> str:
        # Plain pickle, not the socket's own (multiprocessing's pickler, which torch makes send tensors through
        # shared memory): the child loads the model and its example from these bytes, importing torch for them.
        # Our own process's bytes, so not a checkpoint's weights_only concern.
        return self._call("log_pickled_model", pickle.dumps((model, example)), registered_model_name)

    def close(self) -> None:
        """Let the MLflow process leave; every call has been answered, so nothing is lost."""
        if self._child is not None:
            child, self._child = self._child, None
            child.close()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


# The child's side.


class _Forward(logging.Handler):
    """The child's log lines, sent to the launch, which writes them where its own go (console, runner.log)."""

    def __init__(self, connection: Connection, lock) -> None:
        super().__init__()
        self.connection, self.sending = connection, lock  # not self.lock: logging.Handler's own

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.sending:
                self.connection.send(("log", record.levelno, record.name, record.getMessage()))
        except OSError:
            pass


def _portable(err: BaseException) -> BaseException:
    """``err`` as the launch can raise it without importing MLflow: the runner's own and Python's errors as they
    are, any other (MLflow's, requests') as TrackingFailed with the same message."""
    module = type(err).__module__
    if module == "builtins" or module.startswith("runner."):
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling: its message does
            pass
    return TrackingFailed(str(err).strip() or type(err).__name__)


def _state_of(tracker) -> dict[str, Any] | None:
    return None if tracker is None else {key: getattr(tracker, key) for key in _STATE}


def serve(connection: Connection, warm_model_logging: bool = False) -> None:
    import threading

    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):  # the launch decides what a stop does
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    lock = threading.Lock()  # MLflow's system-metrics thread may log while a reply is sent
    runner_log = logging.getLogger("runner")
    runner_log.addHandler(_Forward(connection, lock))
    runner_log.setLevel(logging.INFO)
    runner_log.propagate = False

    import mlflow  # noqa: F401 - the point of this process: paid here while the launch imports torch
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - the default store's, most of opening it

    from runner.tracking import Tracker, prepare_model_logging

    if warm_model_logging:  # before the first call: the launch is still importing torch; the calls wait in order
        prepare_model_logging()
    tracker: Tracker | None = None
    while True:
        try:
            name, args, kwargs, setup = connection.recv()
        except (EOFError, OSError):
            return  # the launch ended
        if name == "__close__":
            return
        try:
            if setup is not None:
                *settings, paths = setup
                sys.path[:0] = [path for path in paths if path not in sys.path]
                tracker = Tracker(*settings)
            if name == "log_pickled_model":
                model, example = pickle.loads(args[0])
                result = tracker.log_pickled_model(model, example, *args[1:])
            else:
                result = getattr(tracker, name)(*args, **kwargs)
                result = None if result is tracker else result
            reply = ("ok", result, _state_of(tracker))
        except BaseException as err:  # noqa: BLE001 - raised in the launch
            reply = ("error", _portable(err), _state_of(tracker))
        try:
            with lock:
                connection.send(reply)
        except OSError:
            return


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), warm_model_logging=WARM_MODEL_LOGGING in sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every call is answered; MLflow's leftover threads (telemetry) need not be waited for
