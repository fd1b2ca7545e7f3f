"""The IOC's life: the threads of the data path built and started, the Channel Access
server run on the asyncio loop, and everything stopped in the reverse order, with the
running files completed."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import zmq

from ..acquisition.controller import AcquisitionController
from ..bridges.rest import RestApi
from ..commandline import configure_logging, prepare_output_root, prompt_monitors
from ..hdf5.options import OutputOptions
from ..output import ownership
from ..pva.ioc import serving_ioc
from ..pvs import access
from ..pvs.ca_server import Context
from ..pvs.ioc import Backend, SfbwIOC, ioc_class
from ..recorder import names
from ..recorder.monitor import Recorder
from ..serving import duplicate
from ..serving.supervision import Supervision, UnusableAccessSecurity, load_access_security
from ..stream import memory
from ..stream.forward import Forwarder
from ..stream.malformed import MalformedCounter
from ..stream.receiver import Receiver
from ..stream.ring import RingBuffer
from ..stream.simulator import Simulator

log = logging.getLogger("sfbw_ioc")

# An IOC still winding down this long after a stop was asked for prints every thread's
# stack to its log (stderr): what its teardown waits for.
TEARDOWN_REPORT_S = 20.0


class StartupFailed(Exception):
    """A resource the IOC was told to use cannot be had: start-up fails, logged CRITICAL."""


def run(args: argparse.Namespace, ioc_options: dict[str, Any],
        run_options: dict[str, Any]) -> int:
    """Run the IOC until SIGTERM or Ctrl-C; the exit status."""
    configure_logging(args.quiet)
    prompt_monitors()
    memory.tune_allocator()  # before any thread: the PVA search below starts some
    if not (args.allow_duplicate_prefix or duplicate.prefix_free(args.prefix, args.pva)):
        return duplicate.EXIT_DUPLICATE_PREFIX
    if not prepare_output_root(args.output_root):
        return 1
    stop = StopRequest()
    status = 0
    with contextlib.ExitStack() as stack:
        try:
            ioc, controllers = _start_data_path(args, ioc_options, stack)
            supervision = stack.enter_context(Supervision(args.watchdog_seconds))
            log.info("IOC %s serving %d PVs; files go to %s", args.prefix, len(ioc.pvdb),
                     controllers[0].output_root)
            asyncio.run(_serve(ioc, controllers[0], args, run_options, supervision, stop))
            if not stop.requested.is_set():
                log.critical("the Channel Access server ended by itself")
                status = 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            if not stop.requested.is_set():
                raise
        except StartupFailed as error:
            log.critical("%s", error)
            status = 1
        except Exception:
            log.critical("the Channel Access server failed", exc_info=True)
            status = 1
    log.info("IOC stopped" if status == 0 else "IOC stopped after a failure")
    return status


def _start_data_path(args: argparse.Namespace, ioc_options: dict[str, Any],
                     stack: contextlib.ExitStack
                     ) -> tuple[SfbwIOC, tuple[AcquisitionController, ...]]:
    """Source, ring, receiver and writers, started; each stop is on ``stack``, so they
    end in the reverse order: running acquisitions are completed with what has arrived
    before the receiver stops."""
    access_config = _access_security(args)
    stream, mode = args.stream, args.mode
    if args.simulate:
        simulator = Simulator("tcp://127.0.0.1:*", rate_hz=args.simulate_rate)
        simulator.start()
        stack.callback(simulator.stop)
        stream, mode = simulator.endpoint, "pull"
        log.info("simulated bsread source on %s", stream)

    ring = RingBuffer(args.buffer_length, args.buffer_bytes)
    trimmer = memory.HeapTrimmer(ring=ring)
    trimmer.start()
    stack.callback(trimmer.stop)
    forwarder = _forwarder(args)
    if forwarder is not None:
        stack.callback(forwarder.close)
    malformed = MalformedCounter()
    receiver = Receiver(stream, ring, malformed, mode=mode, forward=forwarder)
    owner = ownership.Owner(file_mode=args.file_mode, dir_mode=args.dir_mode)
    controllers = tuple(AcquisitionController(ring, malformed, args.output_root,
                                              args.pulse_rate, owner, name=f"acquisition-{n}")
                        for n in range(1, args.writers + 1))
    _record_pvs(args, controllers, stack)
    backend = Backend(ring, receiver, malformed, controllers, args.image_max_pixels, forwarder,
                      args.pulse_rate)
    ioc = ioc_class(args.writers)(backend=backend, **ioc_options)
    if access_config is not None:
        access.apply(access_config, ioc.pvdb)
    receiver.start()
    stack.callback(receiver.stop)
    for controller in controllers:
        controller.start_thread()
        stack.callback(controller.shutdown)
    return ioc, controllers


def _record_pvs(args: argparse.Namespace, controllers: tuple[AcquisitionController, ...],
                stack: contextlib.ExitStack) -> None:
    """Monitor the --record-pvs list; every writer records it and has --swmr's default."""
    try:
        listed = names.parse_file(args.record_pvs.read_text()) if args.record_pvs else ()
    except (OSError, names.PvListError) as error:
        raise StartupFailed(f"cannot record the PVs of {args.record_pvs}: {error}") from error
    recorder = Recorder()
    stack.callback(recorder.stop)
    recorded = recorder.watch(listed)
    for controller in controllers:
        controller.output_options = OutputOptions(args.swmr, recorded, recorder=recorder)


def _forwarder(args: argparse.Namespace) -> Forwarder | None:
    if not args.output_port:
        return None
    try:
        return Forwarder(args.output_port, args.output_mode)
    except zmq.ZMQError as error:
        raise StartupFailed(f"cannot re-publish on port {args.output_port}: {error}") from error


async def _serve(ioc: SfbwIOC, controller: AcquisitionController, args: argparse.Namespace,
                 run_options: dict[str, Any], supervision: Supervision,
                 stop: StopRequest) -> None:
    with stop.cancelling_this_task():
        await _serve_until_stopped(ioc, controller, args, run_options, supervision)


async def _serve_until_stopped(ioc: SfbwIOC, controller: AcquisitionController,
                               args: argparse.Namespace, run_options: dict[str, Any],
                               supervision: Supervision) -> None:
    server = Context(ioc.pvdb, run_options["interfaces"])  # in the loop it runs in

    probe = supervision.startup_hook(server, ioc.first_writer.STATE.pvname)

    async def startup(async_lib) -> None:
        """The server listens now: the watchdog's probe can start, then the IOC's own
        start-up work."""
        await probe(async_lib)
        await ioc.startup(async_lib)

    async with contextlib.AsyncExitStack() as stack:
        if args.pva:
            await stack.enter_async_context(serving_ioc(ioc, ioc.live))
        if args.rest_port:
            rest = RestApi(ioc.first_writer, controller)
            try:
                await rest.start(args.rest_host, args.rest_port)
            except OSError as error:
                raise StartupFailed(f"cannot serve the REST API on {args.rest_host}:"
                                    f"{args.rest_port}: {error}") from error
            stack.push_async_callback(rest.stop)
        try:
            await server.run(log_pv_names=run_options["log_pv_names"], startup_hook=startup)
        finally:
            supervision.stop()


def _access_security(args: argparse.Namespace) -> access.AccessConfig | None:
    try:
        return load_access_security(args.access_security, bool(args.watchdog_seconds))
    except UnusableAccessSecurity as error:
        raise StartupFailed(str(error)) from error


class StopRequest:
    """SIGTERM (systemd, tests) and Ctrl-C stop the IOC so that files get closed. While
    the server runs, a signal cancels its task: the loop winds down at an await, with no
    lock or C call broken into (an exception raised from a signal handler can strike
    anywhere). Before and after, it interrupts as KeyboardInterrupt. Only the first
    signal counts: a second one (Ctrl-C twice, `timeout` signalling the process and then
    its group) must not break off the closing of the file. ``requested`` tells a stop
    asked for from a server that died. A teardown longer than TEARDOWN_REPORT_S is
    reported with every thread's stack."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._cancel: Callable[[], Any] | None = None
        signal.signal(signal.SIGTERM, self._interrupt)
        # A SIGINT ignored by the parent (background jobs) stays ignored.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._interrupt)

    @contextlib.contextmanager
    def cancelling_this_task(self) -> Iterator[None]:
        """Within: a signal cancels the running task (call it in that task)."""
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        self._cancel = lambda: loop.call_soon_threadsafe(task.cancel)
        try:
            yield
        finally:
            self._cancel = None

    def _interrupt(self, signum, frame) -> None:
        if self.requested.is_set():
            log.warning("%s again: still completing the open file", signal.Signals(signum).name)
            return
        self.requested.set()
        faulthandler.dump_traceback_later(TEARDOWN_REPORT_S, file=sys.stderr)
        if self._cancel is None:
            raise KeyboardInterrupt
        self._cancel()
