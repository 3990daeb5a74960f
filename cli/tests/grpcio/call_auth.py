"""Calls the Postern Auth API's Ping and GetRole with Python grpcio (BoringSSL), with stubs that
grpcio-tools generates from api's auth.proto into a temp dir, over mTLS with the files from
`pctl auth sign --format=tls`.

    call_auth.py PROTO_DIR KEY CRT CAS SERVER_NAME TARGET [-- CMD...]

With `-- CMD...` the connection goes through CMD instead (e.g. `ssh -W auth.CLUSTER:3025 ...`):
a loopback listener hands each accepted socket to a new CMD as its stdin and stdout, and gRPC
dials that listener. Exit 77 when grpcio or grpcio-tools cannot be imported.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading


def relay(cmd):
    """A loopback listener; each connection becomes the stdin/stdout of a new `cmd`."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)

    def serve():
        while True:
            conn, _ = lst.accept()
            subprocess.Popen(cmd, stdin=conn.fileno(), stdout=conn.fileno())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return "127.0.0.1:%d" % lst.getsockname()[1]


def main():
    args = sys.argv[1:]
    cmd = []
    if "--" in args:
        i = args.index("--")
        args, cmd = args[:i], args[i + 1:]
    proto_dir, key, crt, cas, server_name, target = args
    try:
        import grpc
        from grpc_tools import protoc
        import importlib.resources
    except ImportError as e:
        print("cannot import grpcio/grpcio-tools: %s" % e, file=sys.stderr)
        sys.exit(77)

    out = tempfile.mkdtemp(prefix="postern-grpcio-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main([
        "protoc", "-I" + proto_dir, "-I" + include,
        "--python_out=" + out, "--grpc_python_out=" + out,
        "postern/auth/v1/auth.proto",
    ])
    if rc != 0:
        sys.exit("protoc failed: %d" % rc)
    sys.path.insert(0, out)
    from postern.auth.v1 import auth_pb2, auth_pb2_grpc

    if cmd:
        target = relay(cmd)
    read = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(cas), private_key=read(key), certificate_chain=read(crt))
    channel = grpc.secure_channel(
        target, creds, options=[("grpc.ssl_target_name_override", server_name)])
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    pong = stub.Ping(auth_pb2.PingRequest(), timeout=30)
    print("ping cluster=%s user=%s" % (pong.cluster, pong.user))
    role = stub.GetRole(auth_pb2.GetRoleRequest(name="api-role"), timeout=30)
    print("role %s" % role.name)
    channel.close()
    os._exit(0)


if __name__ == "__main__":
    main()
