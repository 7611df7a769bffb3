#!/usr/bin/env python3
"""Serves a bucket holding the zero-byte "folder" objects that S3 consoles create (keys ending
in "/"), which a file-system-backed S3 server cannot hold, for the folder-marker test.

Starts moto's S3 server on 127.0.0.1 (a free port), writes into bucket "markers": in/cat.jpg,
in/sub/ (a marker), in/sub/cat.jpg, in/empty/ (a marker of an empty folder) and in/zero.jpg (a real
zero-byte object), with PHOTO's bytes; prints the endpoint URL and serves until stdin closes.

usage: s3_folder_markers.py PHOTO
"""
import socket
import sys

import boto3
from moto.server import ThreadedMotoServer

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                  region_name="us-east-1")
s3.create_bucket(Bucket="markers")
photo = open(sys.argv[1], "rb").read()
for key, body in [("in/cat.jpg", photo), ("in/sub/", b""), ("in/sub/cat.jpg", photo), ("in/empty/", b""),
                  ("in/zero.jpg", b"")]:
    s3.put_object(Bucket="markers", Key=key, Body=body)
print(endpoint, flush=True)
sys.stdin.read()
server.stop()
