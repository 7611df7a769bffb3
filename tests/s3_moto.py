#!/usr/bin/env python3
"""Serves buckets holding keys that a file-system-backed S3 server cannot hold, for the S3 tests.

Starts moto's S3 server on 127.0.0.1 (a free port), fills one bucket with PHOTO's bytes, prints
the endpoint URL and serves until stdin closes.

markers: bucket "markers" holds the zero-byte "folder" objects that S3 consoles create (keys ending
in "/"): in/cat.jpg, in/sub/ (a marker), in/sub/cat.jpg, in/empty/ (a marker of an empty folder)
and in/zero.jpg (a real zero-byte object).

odd-keys N: bucket "oddkeys" holds in/a b/c+d.jpg, keys object_store cannot name (in//x.jpg with an
empty part, in/t<TAB>ab.jpg with a control character), and N more objects in/many/NNNNN.jpg, so
that a listing takes several pages.

usage: s3_moto.py PHOTO markers | s3_moto.py PHOTO odd-keys N
"""
import logging
import socket
import sys

import boto3
from moto.server import ThreadedMotoServer

# One line per request on stderr otherwise.
logging.getLogger("werkzeug").setLevel(logging.ERROR)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                  region_name="us-east-1")
photo = open(sys.argv[1], "rb").read()
if sys.argv[2] == "markers":
    bucket = "markers"
    objects = [("in/cat.jpg", photo), ("in/sub/", b""), ("in/sub/cat.jpg", photo), ("in/empty/", b""),
               ("in/zero.jpg", b"")]
else:
    bucket = "oddkeys"
    objects = [("in/a b/c+d.jpg", photo), ("in//x.jpg", photo), ("in/t\tab.jpg", photo)]
    objects += [(f"in/many/{i:05}.jpg", photo) for i in range(int(sys.argv[3]))]
s3.create_bucket(Bucket=bucket)
for key, body in objects:
    s3.put_object(Bucket=bucket, Key=key, Body=body)
print(endpoint, flush=True)
sys.stdin.read()
server.stop()
