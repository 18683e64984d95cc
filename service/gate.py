"""The server's gate: every call is authenticated and admitted when its headers arrive.

:class:`GateInterceptor` runs when a call's HTTP/2 HEADERS frame has arrived,
before any request message. It

1. refuses a call without a valid token (``UNAUTHENTICATED``): health and
   reflection need none; ReportMetrics needs its job's ingest token for the job
   named by its ``zerotrain-job-id`` metadata (or an admin's token);
2. counts the call in its budget (:mod:`zerotrain.service.admission`) and refuses it with
   ``RESOURCE_EXHAUSTED`` naming the limit when the budget is spent;
3. releases the budget when the call ends, however it ends.

Why refusals and admitted calls are *request-streaming* handlers: for a
unary-request handler grpc-python first waits for the request message, with no
time limit, in a server thread, and only then runs the handler. A refusal
written that way held a thread and an rpc slot for every HEADERS frame that
never got a body (130 such frames on one connection once stopped every rpc,
health included). A request-streaming handler runs at once with an iterator
over the (not yet received) requests: a refusal never touches it, and an
admitted call reads its one request itself. It also guarantees that the
handler runs at all for every admitted call (grpc-python skips a unary
handler whose client went away before sending its request), so the release
of its budget cannot be skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from zerotrain.service.admission import Admission, CallKind
from zerotrain.service.auth import INGEST_METHOD, OPEN_SERVICE_PREFIXES, Authenticator

__all__ = ["UNAUTHENTICATED_MESSAGE", "GateInterceptor", "admitted", "refusal"]

UNAUTHENTICATED_MESSAGE = (
    "missing or invalid bearer token (send 'authorization: Bearer <token>' metadata)"
)
_INGEST_UNAUTHENTICATED = (
    "missing or invalid ingest token (send the job's ingest token as 'authorization: Bearer "
    "<token>' and its id as 'zerotrain-job-id' metadata)"
)


class GateInterceptor(grpc.ServerInterceptor):
    """Authenticate and admit each call at its headers (see the module docstring)."""

    def __init__(self, auth: Authenticator, admission: Admission) -> None:
        self._auth = auth
        self._admission = admission

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, answered by gRPC without a thread
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if method.startswith(OPEN_SERVICE_PREFIXES):
            kind, caller = CallKind.OPEN, "anonymous"
        elif method == INGEST_METHOD:
            ingest_caller = self._auth.ingest_caller(metadata)
            if ingest_caller is None:
                return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, _INGEST_UNAUTHENTICATED)
            kind, caller = CallKind.INGEST, ingest_caller
        else:
            principal = self._auth.authenticate(metadata)
            if principal is None:
                return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            kind = CallKind.STREAM if handler.response_streaming else CallKind.CALL
            caller = principal.name
        why = self._admission.try_admit(kind, caller)
        if why is not None:
            return refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        return admitted(handler, lambda: self._admission.release(kind, caller))


def refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once, never waiting for a request message."""

    def refuse(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )


def admitted(handler: grpc.RpcMethodHandler, release: Callable[[], None]) -> grpc.RpcMethodHandler:
    """``handler`` as a request-streaming handler that calls ``release`` once when the rpc ends."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    method = handler.unary_unary or handler.unary_stream or handler.stream_unary
    method = method or handler.stream_stream

    def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        if not context.add_callback(release):  # the rpc already ended
            release()
        if handler.request_streaming:
            return method(requests, context)
        return method(_single(requests, context), context)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(run, **kwargs)
    return grpc.stream_unary_rpc_method_handler(run, **kwargs)


def _single(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    """The one request of a unary-request rpc, read from the request stream."""
    for request in requests:
        return request
    if context.is_active():
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "expected exactly one request message")
    # gRPC already answered (a request it could not deserialize: INTERNAL "Exception
    # deserializing request!") or the client left; aborting ends the handler quietly.
    context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request arrived")
