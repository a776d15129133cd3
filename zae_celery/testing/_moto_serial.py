"""Run moto's server one request at a time: ``python -m zae_celery.testing._moto_serial PORT``.

``moto_server`` serves requests in threads without a lock around each item, so two
concurrent conditional updates of several attributes of one item can both pass their
conditions (measured: 1-3 requests over a 10/s bucket with 8 threads; none on DynamoDB
Local). DynamoDB applies each conditional write atomically; serving one request at a time
restores that for the engine's tests and the demo.
"""

from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


class _Handler(MotoRequestHandler):
    # One thread serves every connection: a client that connects and then stalls (a
    # connection left half-open by a dropped proxy, say) must not hold it for ever.
    timeout = 10


def main() -> None:
    """Serve moto on 127.0.0.1:PORT, single-threaded."""
    port = int(sys.argv[1])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, app, threaded=False, request_handler=_Handler)


if __name__ == "__main__":
    main()
