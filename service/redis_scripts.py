"""The Lua scripts behind the store: each one is a single atomic round trip.

Every key a script touches belongs to one conversation and shares its hash tag, so the scripts
run unchanged on Redis Cluster. The tenant index is passed as an extra key only on a single node
(standalone or Sentinel); on a Cluster it lives in another slot and is written beside the script.
"""

# The sliding TTL of a conversation: its own `ttl_seconds` or the default; 0 means never expire.
_SLIDE_TTL = r"""
local function slide_ttl(meta, log, default_ttl)
  local ttl = tonumber(redis.call('HGET', meta, 'ttl_seconds') or default_ttl)
  if ttl > 0 then
    redis.call('EXPIRE', meta, ttl)
    redis.call('EXPIRE', log, ttl)
  else
    redis.call('PERSIST', meta)
    redis.call('PERSIST', log)
  end
end
"""

# The tenant's index: a derived view, so a failure to write it (a key of the wrong type, say) is
# caught with pcall and never aborts the turn it follows. Entries older than the longest TTL a
# conversation may have belong to expired conversations and are pruned; the index key itself
# expires after that long without a write. A ttl of 0 means no cap: nothing pruned or expiring.
_TOUCH_INDEX = r"""
local function touch_index(index, now, member, ttl)
  redis.pcall('ZADD', index, now, member)
  local cap = tonumber(ttl)
  if cap > 0 then
    redis.pcall('ZREMRANGEBYSCORE', index, '-inf', '(' .. (tonumber(now) - cap))
    redis.pcall('EXPIRE', index, cap)
  end
end
"""

# KEYS: log, meta, lock[, idem]   ARGV: lock value, lease ms, default budget, max messages,
# request fingerprint, idempotency key hash, budget scale (estimate units per budget token).
# The window is the longest suffix of the log whose estimates fit the scaled budget.
# Answers {'replay', body} | {'mismatch'} | {'inflight', pttl} | {'busy', pttl}
#       | {'ok', length, meta pairs, window newest first}.
BEGIN_TURN = r"""
if #KEYS == 4 then
  local record = redis.call('GET', KEYS[4])
  if record then
    if string.sub(record, 1, 64) == ARGV[5] then return {'replay', string.sub(record, 66)} end
    return {'mismatch'}
  end
end
local holder = redis.call('GET', KEYS[3])
-- Our own value: a client-side retry of an attempt that did take the lease.
if holder and holder ~= ARGV[1] then
  local pttl = redis.call('PTTL', KEYS[3])
  if #KEYS == 4 then
    local _, _, held_key, held_fp = string.find(holder, '^[^\n]*\n([^\n]*)\n(.*)$')
    if held_key == ARGV[6] then
      if held_fp ~= ARGV[5] then return {'mismatch'} end
      return {'inflight', pttl}
    end
  end
  return {'busy', pttl}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
local length = redis.call('LLEN', KEYS[1])
local budget = tonumber(redis.call('HGET', KEYS[2], 'token_budget') or ARGV[3])
local limit = budget * tonumber(ARGV[7])
local max_messages = tonumber(ARGV[4])
local window = {}
local used = 0
local upper = length
local chunk = 16
local full = false
while upper > 0 and not full do
  local lower = math.max(0, upper - chunk)
  local items = redis.call('LRANGE', KEYS[1], lower, upper - 1)
  for i = #items, 1, -1 do
    local tokens = tonumber(string.match(items[i], '^{"tokens":(%d+)')) or 0
    if used + tokens > limit or #window >= max_messages then full = true break end
    used = used + tokens
    window[#window + 1] = items[i]
  end
  upper = lower
  chunk = chunk * 2
end
return {'ok', length, redis.call('HGETALL', KEYS[2]), window}
"""

# KEYS: log, meta, lock, idem, idem set, index (unused ones repeat the log key)
# ARGV: lock value, expected length, now, default ttl, has idem, idem record, idem ttl,
# has index, index member, input tokens, output tokens, index ttl, message count, messages...,
# then meta field/value pairs.  Answers {'ok', length} | {'lost'} | {'conflict'}.
# Messages are pushed a hundred at a time: `unpack` of thousands of arguments overflows Lua's
# C stack ("too many results to unpack").
COMMIT_TURN = (
    _SLIDE_TTL
    + _TOUCH_INDEX
    + r"""
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  -- A client-side retry of a commit that already applied must not report a lost lease.
  if redis.call('HGET', KEYS[2], 'last_turn') == ARGV[1] then
    return {'ok', redis.call('LLEN', KEYS[1])}
  end
  return {'lost'}
end
if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[3])
  return {'conflict'}
end
local count = tonumber(ARGV[13])
local length = redis.call('LLEN', KEYS[1])
for first = 14, 13 + count, 100 do
  length = redis.call('RPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 99, 13 + count)))
end
for i = 14 + count, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSETNX', KEYS[2], 'created_at', ARGV[3])
redis.call('HSET', KEYS[2], 'updated_at', ARGV[3], 'last_turn', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[10])
redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[11])
slide_ttl(KEYS[2], KEYS[1], ARGV[4])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
  redis.call('SADD', KEYS[5], KEYS[4])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
if ARGV[8] == '1' then touch_index(KEYS[6], ARGV[3], ARGV[9], ARGV[12]) end
redis.call('DEL', KEYS[3])
return {'ok', length}
"""
)

# KEYS: lock   ARGV: lock value, lease ms.  1 if the lease was ours and is extended.
RENEW_LOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock   ARGV: lock value.  1 if the lease was ours and is released.
RELEASE_LOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: meta, log[, index]   ARGV: now, default ttl, index member, index ttl, then
# op/field/value triples (op 'set' or 'del').  Answers 1 when the conversation was created.
UPSERT_META = (
    _SLIDE_TTL
    + _TOUCH_INDEX
    + r"""
local created = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
for i = 5, #ARGV, 3 do
  if ARGV[i] == 'set' then
    redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HDEL', KEYS[1], ARGV[i + 1])
  end
end
slide_ttl(KEYS[1], KEYS[2], ARGV[2])
if #KEYS == 3 then touch_index(KEYS[3], ARGV[1], ARGV[3], ARGV[4]) end
if created then return 1 end
return 0
"""
)

# KEYS: log, meta, lock, idem set[, index]   ARGV: index member.
# Answers {'busy', pttl} while a turn holds the lock, else {'ok', existed}.
DELETE_CONVERSATION = r"""
if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', redis.call('PTTL', KEYS[3])} end
local existed = redis.call('EXISTS', KEYS[2])
for _, key in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', key) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
if #KEYS == 5 then redis.pcall('ZREM', KEYS[5], ARGV[1]) end
return {'ok', existed}
"""
