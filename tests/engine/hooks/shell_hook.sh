#!/bin/sh
# A hook in POSIX shell, without the SDK: the contract is only environment variables and JSON
# lines. Passes a record with its data.txt size as a feature; rejects one without data.txt.
# (The sed extraction assumes ids without double quotes or backslashes, as in the test.)
set -eu
while IFS= read -r line; do
    id=$(printf '%s\n' "$line" | sed 's/.*"id": *"\([^"]*\)".*/\1/')
    dir=$(printf '%s\n' "$line" | sed 's/.*"files_dir": *"\([^"]*\)".*/\1/')
    data="$OSA_FILES/$dir/data.txt"
    if [ -f "$data" ]; then
        bytes=$(wc -c < "$data" | tr -d ' ')
        printf '{"id": "%s", "features": [{"bytes": %s}]}\n' "$id" "$bytes" >> "$OSA_OUT/features.jsonl"
    else
        printf '{"id": "%s", "reason": "no data.txt"}\n' "$id" >> "$OSA_OUT/rejections.jsonl"
    fi
done < "$OSA_IN/records.jsonl"
