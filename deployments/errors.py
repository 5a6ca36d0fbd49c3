"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
         500: "internal_server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def from_validation(exc, renamed: dict[str, str] | None = None) -> APIError:
    """A pydantic ValidationError -> 400 naming the offending parameter (the path of
    fields and list indices; pydantic's names of union members are left out; `renamed` gives
    the client's name of a top-level field validated under another name)."""
    # the most specific error: where a value matches no member of a union, pydantic reports one
    # error per member, and the deepest names what is wrong (not "should be a valid string")
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    parts = [str(p) for p in err["loc"] if p != "body" and not _union_member(p)]
    if parts and renamed and parts[0] in renamed:
        parts[0] = renamed[parts[0]]
    param = ".".join(parts) or None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"{param}: this server does not support the parameter `{param}`", param=param,
                        code="unsupported_parameter")
    message = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_parameter")


def _union_member(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part[:1].isupper())  # a model class's name (fields are snake_case)
