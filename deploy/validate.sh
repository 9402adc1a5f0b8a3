#!/usr/bin/env bash
# Checks everything under deploy/ the way the tools that consume it would:
# yamllint; the Kubernetes manifests (each overlay built with kustomize when
# kubectl or kustomize is there, and every file) with kubernetes-validate;
# promtool on the Prometheus config, rules and rule tests; systemd-analyze
# verify on the unit; the Grafana dashboard as JSON whose metrics exist; the
# flowgate configs with `flowgate check`. Run by .ci/run (which installs the
# tools); alone: bash deploy/validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
step() { echo "== $*"; }

step yamllint
yamllint -c deploy/.yamllint deploy/k8s deploy/prometheus

step "kubernetes-validate $(kubernetes-validate --version 2>/dev/null | head -1)"
manifests=()
for f in deploy/k8s/base/*.yaml deploy/k8s/overlays/*/*.yaml; do
  case "$(basename "$f")" in kustomization.yaml) continue ;; esac
  manifests+=("$f")
done
kubernetes-validate --strict "${manifests[@]}" >/dev/null
kustomize_cmd=()
if command -v kustomize >/dev/null 2>&1; then kustomize_cmd=(kustomize build);
elif command -v kubectl >/dev/null 2>&1; then kustomize_cmd=(kubectl kustomize); fi
if [ ${#kustomize_cmd[@]} -gt 0 ]; then
  for overlay in deploy/k8s/overlays/*/; do
    name=$(basename "$overlay")
    "${kustomize_cmd[@]}" "$overlay" >"$tmp/$name.yaml"
    kubernetes-validate --strict "$tmp/$name.yaml" >/dev/null
    echo "overlay $name: $(grep -c '^kind:' "$tmp/$name.yaml") resources valid"
  done
else
  echo "no kustomize or kubectl: overlays not built (their files were validated one by one)"
fi
for f in flows.json settings.js; do
  cmp -s "deploy/k8s/base/$f" "deploy/examples/nodered-ha/$f" \
    || { echo "deploy/k8s/base/$f differs from deploy/examples/nodered-ha/$f: copy it again"; exit 1; }
done

step promtool
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "systemd-analyze verify"
bin=$(command -v true)
[ -x target/debug/flowgate ] && bin=$PWD/target/debug/flowgate
sed "s|/usr/local/bin/flowgate|$bin|g" deploy/systemd/flowgate.service >"$tmp/flowgate.service"
systemd-analyze verify "$tmp/flowgate.service"
echo "flowgate.service verified"

step "grafana dashboard"
python3 - deploy/grafana/flowgate-dashboard.json src/metrics/names.rs <<'PY'
import json, re, sys
dash = json.load(open(sys.argv[1]))
names = set(re.findall(r'"(flowgate_[a-z_]+)"', open(sys.argv[2]).read()))
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"flowgate_[a-z_]+", e)}
unknown = sorted(m for m in used if m not in names)
if unknown:
    sys.exit(f"dashboard uses metrics flowgate does not export: {unknown}")
print(f"{len(dash['panels'])} panels, {len(exprs)} queries, metrics all exported")
PY

step "flowgate check"
# token and password files live in secrets at run time: stand-ins here
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/token"
echo 'stand-in password' | cargo run --quiet -- passwd "$tmp/editors" admin 2>/dev/null
for cfg in config/flowgate.toml deploy/container/flowgate.toml deploy/k8s/base/flowgate.toml deploy/k8s/overlays/*/flowgate.toml; do
  sed -e "s|^token_file = .*|token_file = \"$tmp/token\"|" \
      -e "s|^password_file = \"/etc/flowgate-editors/editors\"|password_file = \"$tmp/editors\"|" "$cfg" >"$tmp/check.toml"
  cargo run --quiet -- check --config "$tmp/check.toml" >/dev/null
  echo "$cfg: valid"
done
echo "deploy/ is valid"
