#!lua flags=allow-oom
-- A try ends without an outcome, to be tried again later: unless a cancel or delete came first.
-- KEYS: 1 metadata, 2 running set
-- ARGV: 1 job id
-- Returns 1 when the job still wants its next try, 0 when it has been canceled, deleted or has ended
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'status') == 1 then return 0 end
return 1
