from .base import Method, StageContext, build_method, register

__all__ = ["Method", "StageContext", "build_method", "register"]
