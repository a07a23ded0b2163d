#!/usr/bin/env python3
"""Run a real ClickHouse server (26.9, from PyPI chdb-core) on 127.0.0.1.

Usage: clickhouse_server.py DATA_DIR HTTP_PORT TCP_PORT [HTTPS_PORT TLS_DIR]

With HTTPS_PORT and TLS_DIR (server.pem, server.key and ca.pem, as
scripts/stack.sh generates them), the server also answers HTTPS there.
clickhouse-local opens only its HTTP and TCP handlers (`SYSTEM START LISTEN
HTTPS` is refused, `https_port` is ignored), so TLS is terminated in this
process by Python's ssl (OpenSSL) and the bytes go on to HTTP_PORT: the
client's side of TLS is real, and the endpoint dies with the server (kill -9
or SIGSTOP of this process takes both down). A client certificate is verified
against ca.pem when one is sent, not required.

chdb embeds clickhouse-local. clickhouse-local opens the real HTTP and native
TCP handlers on `SYSTEM START LISTEN`, but they live only while that query
call runs, so we follow it with an endless query in a worker thread.

Layout: the working directory is DATA_DIR's parent (clickhouse-local reads
./config.xml from its cwd), so give each server its own parent directory, e.g.
`<tmp>/ch1/data` and `<tmp>/ch2/data`. One process per DATA_DIR: ClickHouse
locks it. Restarting on the same DATA_DIR (also after kill -9) keeps the
MergeTree data.

On SIGTERM/SIGINT we kill exactly the keep-alive query over HTTP (a running
_chdb.query ignores SIGTERM); clickhouse-local then shuts down cleanly.
Prints "ready" on stdout once `SELECT 1` answers over HTTP.
"""
import os
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request

KEEPALIVE = "SELECT sleepEachRow(1) FROM numbers(1000000000)"
KEEPALIVE_QUERY = (
    KEEPALIVE + " SETTINGS max_block_size=1, function_sleep_max_microseconds_per_block=0 FORMAT Null"
)
# Kill only our keep-alive query: never a broad KILL QUERY.
KILL_QUERY = "KILL QUERY WHERE query LIKE '" + KEEPALIVE + "%' SYNC"
MARKER = "<!-- written by scripts/clickhouse_server.py -->"

# Kafka engine: librdkafka's 45 s session timeout makes a group join take
# ~22 s on tansu; 2 s / 600 ms makes it ~1 s. The pool size lets more than
# two kafka_num_consumers join. The default profile is left alone (this
# build has async_insert=1 by default; never set max_execution_time there,
# it would kill the keep-alive query).
CONFIG = """<clickhouse>
    {marker}
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <max_concurrent_queries>200</max_concurrent_queries>
    <background_message_broker_schedule_pool_size>4</background_message_broker_schedule_pool_size>
    <!-- As on a real server: `chbridge status` reads the last insert times here. -->
    <query_log>
        <database>system</database>
        <table>query_log</table>
        <flush_interval_milliseconds>1000</flush_interval_milliseconds>
    </query_log>
    <kafka>
        <session_timeout_ms>2000</session_timeout_ms>
        <heartbeat_interval_ms>600</heartbeat_interval_ms>
    </kafka>
</clickhouse>
"""



def serve_https(port, tls_dir, http_port, failure):
    """TLS on 127.0.0.1:port, each connection piped to the HTTP port."""
    import asyncio
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(tls_dir, "server.pem"), os.path.join(tls_dir, "server.key"))
    ctx.load_verify_locations(os.path.join(tls_dir, "ca.pem"))
    ctx.verify_mode = ssl.CERT_OPTIONAL

    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def client(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", http_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main():
        server = await asyncio.start_server(client, "127.0.0.1", port, ssl=ctx, backlog=256)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(main())
    except Exception as e:
        failure.append("https on port %d: %s" % (port, e))


def http(port, sql, timeout=5.0):
    url = "http://127.0.0.1:%d/?%s" % (port, urllib.parse.urlencode({"query": sql}))
    with urllib.request.urlopen(url, data=b"", timeout=timeout) as r:
        return r.read()


def main():
    if len(sys.argv) not in (4, 6):
        sys.exit("usage: clickhouse_server.py DATA_DIR HTTP_PORT TCP_PORT [HTTPS_PORT TLS_DIR]")
    data_dir = os.path.realpath(sys.argv[1])
    http_port, tcp_port = int(sys.argv[2]), int(sys.argv[3])
    https = None
    if len(sys.argv) == 6:
        https = (int(sys.argv[4]), os.path.realpath(sys.argv[5]))
    work_dir = os.path.dirname(data_dir)
    os.makedirs(data_dir, exist_ok=True)

    # Refuse to clobber a config.xml we did not write (e.g. DATA_DIR=/tmp/x
    # would put ours into /tmp).
    cfg_path = os.path.join(work_dir, "config.xml")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if MARKER not in f.read():
                sys.exit("%s exists and was not written by this script; "
                         "use DATA_DIR=<own dir>/data" % cfg_path)
    with open(cfg_path + ".tmp", "w") as f:
        f.write(CONFIG.format(marker=MARKER, http=http_port, tcp=tcp_port))
    os.replace(cfg_path + ".tmp", cfg_path)
    os.chdir(work_dir)

    from chdb import _chdb  # imported after the argument checks

    stopping = threading.Event()
    failure = []

    def serve():
        try:
            # The output format given here becomes the HTTP default format;
            # TabSeparated matches a real server.
            r = _chdb.query("SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; " + KEEPALIVE_QUERY,
                            "TabSeparated", path=data_dir)
            # Errors (port in use, data dir locked) come back in the result.
            failure.append(r.error_message() or "keep-alive query ended (see the error above)")
        except Exception as e:
            failure.append(e)

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t = threading.Thread(target=serve, name="clickhouse", daemon=True)
    t.start()
    if https:
        threading.Thread(target=serve_https, args=(https[0], https[1], http_port, failure),
                         name="https", daemon=True).start()

    def ours():
        # True once our own server answers on HTTP_PORT. Compares the data
        # path, so another server already holding the port is never taken
        # for ours (neither as "ready" nor as the target of KILL QUERY).
        try:
            path = http(http_port, "SELECT value FROM system.server_settings "
                        "WHERE name = 'path' FORMAT TSV", timeout=1)
            return path.decode().strip().rstrip("/") == data_dir
        except Exception:
            return False

    ready = False
    while t.is_alive() and not stopping.is_set() and not failure:
        if not ready and ours():
            ready = True
            print("ready: http=%d tcp=%d https=%s data=%s"
                  % (http_port, tcp_port, https[0] if https else "-", data_dir), flush=True)
        time.sleep(0.1)

    if not t.is_alive() or failure:  # the server query ended on its own, or HTTPS failed
        print("clickhouse stopped: %s" % (failure[0] if failure else "unknown error"), file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: clickhouse-local may still be serving

    # Shutdown: kill only the keep-alive query, then let clickhouse-local exit.
    # Retried briefly: a signal may arrive before the HTTP handler is up.
    deadline = time.time() + 5
    while t.is_alive():
        if ready or ours():
            try:
                http(http_port, KILL_QUERY, timeout=10)
                break
            except Exception as e:
                print("KILL QUERY failed: %s" % e, file=sys.stderr, flush=True)
        if time.time() > deadline:
            os._exit(1)  # like kill -9: the data dir stays usable
        time.sleep(0.1)
    t.join(timeout=20)
    print("stopped", flush=True)
    sys.stdout.flush()
    os._exit(0 if not t.is_alive() else 1)


if __name__ == "__main__":
    main()
