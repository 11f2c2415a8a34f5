#!/usr/bin/env bash
# Builds the runtime image and checks it the way a plant would break it: the broker is SIGKILLed while
# the container inspects a video, the container is SIGKILLed while the broker is down, then both come
# back; every alert raised before the kill must reach a consumer from the outbox kept in the volume.
# Needs a Docker daemon, mosquitto + mosquitto_sub on this machine, an exported bundle and a video.
#   bash deploy/docker/smoke.sh --model bundles/stfpm-int8 --video line.avi [--no-build] [--port 18830]
set -euo pipefail
cd "$(dirname "$0")/../.."

image=edge-ad:0.1.0 port=18830 build=1 model="" video=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --video) video=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "smoke.sh: error: unknown option $1" >&2; exit 2 ;;
  esac
done
fail() { echo "smoke.sh: error: $*" >&2; exit 2; }
[ -f "$model/bundle.json" ] || fail "--model must be a bundle folder with bundle.json (got '${model}')"
[ -f "$video" ] || fail "--video must be a video file (got '${video}')"
for tool in docker mosquitto mosquitto_sub; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (is dockerd running?)"

work=$(mktemp -d) volume="edge-ad-smoke-$$" container="edge-ad-smoke-$$"
cleanup() {
  docker rm -f "$container" >/dev/null 2>&1 || true
  docker volume rm -f "$volume" >/dev/null 2>&1 || true
  [ -n "${broker_pid:-}" ] && kill -9 "$broker_pid" 2>/dev/null || true
  [ -n "${consumer_pid:-}" ] && kill "$consumer_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
chmod 0777 "$work"  # mosquitto drops to its own user and writes its persistence file here

if [ "$build" = 1 ]; then
  echo "building $image"
  DOCKER_BUILDKIT=1 docker build -q -f deploy/docker/Dockerfile -t "$image" . >/dev/null
fi
echo "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
absent=$(docker run --rm --entrypoint python "$image" -c \
  "import importlib.util as u; print(' '.join(m for m in ('torch', 'nncf', 'sklearn', 'training') if u.find_spec(m)))")
[ -z "$absent" ] || fail "the runtime image contains $absent"
echo "no torch, nncf, scikit-learn or training code in the image"

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\n' \
  "$port" "$work" > "$work/mosquitto.conf"
start_broker() {
  mosquitto -c "$work/mosquitto.conf" >> "$work/broker.log" 2>&1 & broker_pid=$!; disown
  sleep 0.5
  # A persistent QoS 1 session, as a plant's consumer would hold: nothing is missed while it is away.
  mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -c -i edge-ad-smoke-consumer -v \
    -t 'edge-ad/+/+/alert' -t 'edge-ad/+/+/clear' >> "$work/received.txt" 2>&1 & consumer_pid=$!; disown
  sleep 0.3
}
run_args=(--network host --read-only --tmpfs /tmp -v "$volume:/var/lib/edge-ad"
          -v "$(realpath "$model"):/bundle:ro" -v "$(realpath "$video"):/video:ro" "$image"
          --model /bundle --video /video --realtime --cooldown 10f --device-id smoke --camera-id cam0
          --mqtt-host 127.0.0.1 --mqtt-port "$port" --mqtt-retry-delay 0.2 --mqtt-retry-max-delay 1 --jsonl -)

start_broker
docker run --name "$container" "${run_args[@]}" > "$work/raised.jsonl" 2> "$work/run1.log" &
for _ in $(seq 600); do grep -q "connected to MQTT" "$work/run1.log" && break; sleep 0.05; done
grep -q "connected to MQTT" "$work/run1.log" || fail "container did not connect: $(tail -1 "$work/run1.log")"
sleep 0.3
kill -9 "$broker_pid"; kill "$consumer_pid"; echo "broker SIGKILLed"
sleep 2.5
docker kill "$container" >/dev/null; wait || true; echo "container SIGKILLed while the broker is down"
docker rm "$container" >/dev/null

start_broker
docker run --rm "${run_args[@]}" --max-frames 5 > /dev/null 2> "$work/run2.log"
sleep 1

ids() { grep -oE '"event_id":"[0-9a-f-]{36}"' | cut -d'"' -f4; }
raised=$(grep -E '"event":"(alert|clear)"' "$work/raised.jsonl" | ids | sort)
received=$(ids < "$work/received.txt" | sort -u)
missing=$(comm -23 <(echo "$raised") <(echo "$received") | grep -c . || true)
n_raised=$(echo "$raised" | grep -c . || true)
echo "$(grep -m1 'undelivered' "$work/run2.log" | sed 's/^edge-ad: //' || true)"
echo "events raised before the kill: $n_raised; delivered: $((n_raised - missing)); copies received: $(ids < "$work/received.txt" | grep -c . || true)"
[ "$n_raised" -gt 0 ] || fail "no alert was raised before the kill (is the video anomalous for this model?)"
[ "$missing" -eq 0 ] || fail "$missing event(s) lost"
echo "OK: nothing lost"
