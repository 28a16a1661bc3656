"""Training backends behind one interface (see base.Backend)."""

from dist_train.backends.base import Backend, build_backend

__all__ = ["Backend", "build_backend"]
