"""The post-processing example's app, in a worker process that traces: OpenTelemetry's SDK writes every
span as one JSON line to ``$SAGAS_TEST_SPANS.<pid>``. Test wiring only (the library configures no SDK):

    PYTHONPATH=. SAGAS_TEST_SPANS=/tmp/spans sagas run tests.observability.traced_app:app
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from examples.postprocessing import app
from tests.observability.spanfile import JsonLinesExporter

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(f"{os.environ['SAGAS_TEST_SPANS']}.{os.getpid()}")))
trace.set_tracer_provider(provider)

__all__ = ["app"]
