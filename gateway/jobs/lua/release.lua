#!lua flags=allow-oom
-- A try ends without an outcome, to be tried again later: unless a cancel or delete came first.
-- KEYS: 1 metadata, 2 running set
-- ARGV: 1 job id, 2 the try's fence (its attempt number, from start.lua)
-- Returns 1 when the job still wants its next try, 0 when it has been canceled, deleted or has ended, -1 when
-- a newer try has started since (this one stalled past its lease): then the newer try's state stays as it is.
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if attempts and attempts ~= ARGV[2] then return -1 end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'status') == 1 then return 0 end
return 1
