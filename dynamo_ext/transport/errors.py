"""Typed transfer errors. Every failure a caller of ``transport/`` can see is one of these."""

from __future__ import annotations


class TransferError(Exception):
    """Base class of every transport error."""


class LayoutMismatch(TransferError):
    """Source and destination KV layouts (or dtypes) differ: refused before any byte moves."""


class PeerUnreachable(TransferError):
    """The peer agent is unknown, disconnected, or died during the transfer."""


class TransferTimeout(TransferError):
    """The transfer did not complete before its deadline (derived from bytes / expected bandwidth)."""


class BackendError(TransferError):
    """The backend (NIXL/UCX, CUDA, socket) reported an error that is not one of the above."""


class InvalidBlocks(TransferError, ValueError):
    """Block ids out of range, duplicated destinations, or source/destination lists of different length."""


class UnregisteredMemory(TransferError):
    """A transfer names memory that was not registered with the backend at start-up."""
