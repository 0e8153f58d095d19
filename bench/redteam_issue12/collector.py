"""OTLP/HTTP sink: writes each span's name, trace id, parent and attributes to spans.jsonl."""

import http.server
import json
import sys

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

OUT = sys.argv[2]


class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with open(OUT, "a") as f:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        d = MessageToDict(s)
                        f.write(
                            json.dumps(
                                {
                                    "name": d.get("name"),
                                    "traceId": s.trace_id.hex(),
                                    "parent": s.parent_span_id.hex(),
                                    "attrs": d.get("attributes", []),
                                }
                            )
                            + "\n"
                        )
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
