#!/usr/bin/env bash
# buf breaking (FILE rules) of proto/ against a previous version of the API:
#   BUF_AGAINST=<buf input>   e.g. '../.git#branch=release-1,subdir=proto' or a directory
#   otherwise                 the git branch BUF_BRANCH (default: main), subdirectory proto/
# With no previous commit holding proto/*.proto there is nothing to break: exit 0.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
BUF=${BUF:-$ROOT/build/tools/node_modules/.bin/buf}
if [[ ! -x $BUF ]]; then
  echo "breaking.sh: buf not found at $BUF; run deploy/host/install-deps.sh" >&2
  exit 2
fi

if [[ -n ${BUF_AGAINST:-} ]]; then
  against=$BUF_AGAINST
else
  branch=${BUF_BRANCH:-main}
  if ! git -C "$ROOT" rev-parse --verify -q "$branch^{commit}" >/dev/null; then
    echo "breaking.sh: no git branch '$branch' to compare against; nothing to check" >&2
    exit 0
  fi
  if ! git -C "$ROOT" ls-tree -r --name-only "$branch" -- proto/tracefleet | grep -q '\.proto$'; then
    echo "breaking.sh: branch '$branch' has no proto/tracefleet/**/*.proto yet (first version of the API); nothing to check" >&2
    exit 0
  fi
  against="$ROOT/.git#branch=$branch,subdir=proto"
fi
echo "breaking.sh: buf breaking against $against" >&2
"$BUF" breaking --against "$against"
echo "breaking.sh: no breaking changes" >&2
