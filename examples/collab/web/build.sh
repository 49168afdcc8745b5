#!/usr/bin/env bash
# Rebuild ../static/app.js from src/ with the exact versions pinned in package-lock.json.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run --silent build
ls -l ../static/app.js
