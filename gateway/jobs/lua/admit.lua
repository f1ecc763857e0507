#!lua flags=no-writes
-- Whether an owner may submit now, by its own limits, before its image is read: a refusal then costs no
-- upload. submit.lua decides again, atomically, with the image stored.
-- ARGV: 1 the owner, 2 its settings as JSON (as submit.lua takes them), 3 now (ms), 4 S
-- Returns {'' or the limit hit ('key_queue' | 'key_rate'), ms to come back, tokens in its rate bucket (-1: no
-- rate), its jobs accepted and not ended}
local S = cjson.decode(ARGV[4])
local answer = key_admission(S, ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3]))
return {answer.refused or '', answer.retry_ms, math.floor(answer.tokens), answer.queued}
