"""The Lua scripts behind the store: each one is a single atomic round trip.

Every key a script touches belongs to one conversation and shares its hash tag, so the scripts
run unchanged on Redis Cluster. The tenant index is passed as an extra key only on a single node
(standalone or Sentinel); on a Cluster it lives in another slot and is written beside the script.
"""

# The sliding TTL of a conversation: its own `ttl_seconds` or the default; 0 means never expire.
# `meta` and every list beside it, read once (each command a script runs costs Redis time).
# `set_ttl` for a script that read `ttl_seconds` with other fields already.
_SLIDE_TTL = r"""
local function set_ttl(keys, ttl)
  for _, key in ipairs(keys) do
    if ttl > 0 then redis.call('EXPIRE', key, ttl) else redis.call('PERSIST', key) end
  end
end
local function slide_ttl(meta, lists, default_ttl)
  set_ttl({meta, unpack(lists)}, tonumber(redis.call('HGET', meta, 'ttl_seconds') or default_ttl))
end
"""

# The tenant's index: a derived view, so a failure to write it (a key of the wrong type, say) is
# caught with pcall and never aborts the turn it follows. Entries older than the longest TTL a
# conversation may have belong to expired conversations and are pruned when a new member is added
# (only a new member grows the index; the listing skips and removes entries whose conversation is
# gone, so pruning bounds its size, nothing more); the index key itself expires after that long
# without a write. A ttl of 0 means no cap: nothing pruned or expiring.
_TOUCH_INDEX = r"""
local function touch_index(index, now, member, ttl)
  local added = redis.pcall('ZADD', index, now, member)
  local cap = tonumber(ttl)
  if cap > 0 then
    if added == 1 then
      redis.pcall('ZREMRANGEBYSCORE', index, '-inf', '(' .. (tonumber(now) - cap))
    end
    redis.pcall('EXPIRE', index, cap)
  end
end
"""

# The token list (`tok`) holds each stored message's estimate beside it, at the same index, so
# the window read needs no JSON of the log. A log written without it (before it existed, or by a
# script that left it out) is noticed by its length and rebuilt from the records: a one-off
# migration, after which reads are O(window) again.
_TOKENS = r"""
local function rebuild_tokens(log, tok, length)
  redis.call('DEL', tok)
  for first = 0, length - 1, 500 do
    local items = redis.call('LRANGE', log, first, first + 499)
    local tokens = {}
    for i, item in ipairs(items) do
      local ok, record = pcall(cjson.decode, item)
      tokens[i] = (ok and type(record) == 'table' and tonumber(record.tokens)) or 0
    end
    redis.call('RPUSH', tok, unpack(tokens))
  end
  local ttl = redis.call('PTTL', log)
  if ttl > 0 then redis.call('PEXPIRE', tok, ttl) end
end
"""

# Rewriting the log from seq `from` on (truncate, regenerate, edit and resend: service/editing.py),
# in the script that does it: every list kept beside the log is cut with it, the summaries that
# cover a cut message are forgotten (service/summary_plan.py's fields_to_forget, here so that a
# summary stored between a turn's start and its commit is seen), a summary job running now
# will find its compare-and-set base moved, a window start at or past the cut goes back to 1
# (the next turn chooses afresh), and the log's generation moves on (cursors of old pages).
_REWRITE = r"""
local SUMMARY_CURRENT = {'summary_text', 'summary_through', 'summary_version', 'summary_by',
                         'summary_at'}
local SUMMARY_NEXT = {'summary_next_text', 'summary_next_through', 'summary_next_version',
                      'summary_next_by', 'summary_next_at'}
local function rewrite_from(lists, meta, sumlock, from)
  for _, key in ipairs(lists) do
    if from <= 1 then redis.call('DEL', key) else redis.call('LTRIM', key, 0, from - 2) end
  end
  local f = redis.call('HMGET', meta, 'summary_text', 'summary_through', 'summary_version',
                       'summary_next_text', 'summary_next_through', 'summary_next_version')
  local version = math.max(tonumber(f[3] or '0') or 0, tonumber(f[6] or '0') or 0)
  local current = tonumber(f[2] or '0') or 0
  local upcoming = tonumber(f[5] or '0') or 0
  local forget_current = f[1] and f[1] ~= '' and current > 0 and current >= from
  if forget_current then redis.call('HDEL', meta, unpack(SUMMARY_CURRENT)) end
  if forget_current or (f[4] and f[4] ~= '' and upcoming > 0 and upcoming >= from) then
    redis.call('HDEL', meta, unpack(SUMMARY_NEXT))
  end
  if redis.call('EXISTS', sumlock) == 1 then
    redis.call('HSET', meta, 'summary_version', version + 1)
  end
  local start = tonumber(redis.call('HGET', meta, 'window_start') or '0') or 0
  if start >= from then redis.call('HDEL', meta, 'window_start') end
  return redis.call('HINCRBY', meta, 'generation', 1)
end
"""

# The hash list (`hash`) holds each stored message's content hash beside it (service/history.py).
# Python computes hashes, so a list that does not match the log's length (messages stored before
# it existed, or by a writer that left it out) cannot be rebuilt here: it is laid anew with
# UNKNOWN ('') entries, which a turn that needs them computes from the records and writes back.
# So is a list written before the log's last rewrite: a script that rewrites the log in place
# (truncate, replace) moves meta's `generation` on, and the list records, in `hash_generation`,
# the generation it was written for; a rewrite that left the list as it was cannot leave stale
# hashes behind, even where the lengths agree by chance.
# `align_hashes_to` for a script that read meta's `generation` and `hash_generation` already.
_HASHES = r"""
local function align_hashes_to(log, hash, meta, length, generation, written_for)
  if redis.call('LLEN', hash) == length and generation == written_for then return end
  if generation ~= written_for then redis.call('HSET', meta, 'hash_generation', generation) end
  redis.call('DEL', hash)
  for first = 1, length, 500 do
    local blanks = {}
    for i = first, math.min(first + 499, length) do blanks[#blanks + 1] = '' end
    redis.call('RPUSH', hash, unpack(blanks))
  end
  local ttl = redis.call('PTTL', log)
  if ttl > 0 then redis.call('PEXPIRE', hash, ttl) end
end
local function align_hashes(log, hash, meta, length)
  local g = redis.call('HMGET', meta, 'generation', 'hash_generation')
  align_hashes_to(log, hash, meta, length, g[1] or '', g[2] or '')
end
"""

# KEYS: log, tok, meta, lock, hash[, idem]
# ARGV[1]: JSON {lock, lease_ms, budget, scale, max_messages, fingerprint, key_hash, peek,
# hashes, from, regenerate}. With `hashes`, the answer also has the whole hash list and, for its
# UNKNOWN entries, flat (index, record) pairs. With `from` (edit and resend) the history read
# ends before that seq, which must be a stored user message; with `regenerate` it ends before the
# last user message, which is answered again ({'invalid', why} otherwise, lease not taken).
# Reads the suffix of the log from the window start (`window_start` in meta), stopping once the
# estimates pass budget x scale or max_messages: what to forward is decided in service/trim.py.
# Answers {'replay', body} | {'mismatch'} | {'inflight', pttl} | {'busy', pttl}
#       | {'invalid', 'gone' | 'beyond' | 'role' | 'no_user'}
#       | {'ok', length, meta pairs, suffix oldest first, stored length, regenerated message
#          [, hashes, unknown (index, record) pairs]}.
BEGIN_TURN = (
    _TOKENS
    + _HASHES
    + r"""
local p = cjson.decode(ARGV[1])
-- A preview (`peek`) takes no lease and reads no idempotency record: only the read below.
if not p.peek then
  if #KEYS == 6 then
    local record = redis.call('GET', KEYS[6])
    if record then
      if string.sub(record, 1, 64) == p.fingerprint then
        return {'replay', string.sub(record, 66)}
      end
      return {'mismatch'}
    end
  end
  local holder = redis.call('GET', KEYS[4])
  -- Our own value: a client-side retry of an attempt that did take the lease.
  if holder and holder ~= p.lock then
    local pttl = redis.call('PTTL', KEYS[4])
    if #KEYS == 6 then
      local _, _, held_key, held_fp = string.find(holder, '^[^\n]*\n([^\n]*)\n(.*)$')
      if held_key == p.key_hash then
        if held_fp ~= p.fingerprint then return {'mismatch'} end
        return {'inflight', pttl}
      end
    end
    return {'busy', pttl}
  end
end
local stored = redis.call('LLEN', KEYS[1])
local length, again = stored, ''
if p.from or p.regenerate then
  if redis.call('EXISTS', KEYS[3]) == 0 then return {'invalid', 'gone'} end
  if p.from then
    if p.from > stored then return {'invalid', 'beyond'} end
    local ok, record = pcall(cjson.decode, redis.call('LINDEX', KEYS[1], p.from - 1))
    if not ok or type(record) ~= 'table' or record.role ~= 'user' then
      return {'invalid', 'role'}
    end
    length = p.from - 1
  else
    local found = nil
    local upper = stored
    while upper > 0 and not found and stored - upper < p.max_messages do
      local first = math.max(0, upper - 64)
      local items = redis.call('LRANGE', KEYS[1], first, upper - 1)
      for i = #items, 1, -1 do
        local ok, record = pcall(cjson.decode, items[i])
        if ok and type(record) == 'table' and record.role == 'user' then
          found = first + i
          again = items[i]
          break
        end
      end
      upper = first
    end
    if not found then return {'invalid', 'no_user'} end
    length = found - 1
  end
end
if not p.peek then redis.call('SET', KEYS[4], p.lock, 'PX', p.lease_ms) end
if redis.call('LLEN', KEYS[2]) ~= stored then rebuild_tokens(KEYS[1], KEYS[2], stored) end
local settings = redis.call('HMGET', KEYS[3], 'token_budget', 'window_start')
local limit = tonumber(settings[1] or p.budget) * p.scale
local floor = (tonumber(settings[2]) or 1) - 1
if floor < 0 or floor > length then floor = 0 end
-- Estimates read newest first in growing chunks: the first covers an ordinary window whole.
local used, lower, upper, chunk, full = 0, length, length, 64, false
while upper > floor and not full do
  local first = math.max(floor, upper - chunk)
  local tokens = redis.call('LRANGE', KEYS[2], first, upper - 1)
  for i = #tokens, 1, -1 do
    local t = tonumber(tokens[i]) or 0
    if used + t > limit or length - lower >= p.max_messages then full = true break end
    used = used + t
    lower = lower - 1
  end
  upper = first
  chunk = chunk * 2
end
local suffix = {}
if lower < length then suffix = redis.call('LRANGE', KEYS[1], lower, length - 1) end
local meta = redis.call('HGETALL', KEYS[3])
if p.hashes then
  align_hashes(KEYS[1], KEYS[5], KEYS[3], stored)
  local hashes = redis.call('LRANGE', KEYS[5], 0, -1)
  local unknown = {}
  for i, h in ipairs(hashes) do
    if h == '' then
      unknown[#unknown + 1] = i - 1
      unknown[#unknown + 1] = redis.call('LINDEX', KEYS[1], i - 1)
    end
  end
  return {'ok', length, meta, suffix, stored, again, hashes, unknown}
end
return {'ok', length, meta, suffix, stored, again}
"""
)

# KEYS: log, tok, meta, lock, idem, idem set, index (unused ones repeat the log key), hash,
# sumlock
# ARGV[1]: JSON {lock, expected, now, ttl, idem (bool), idem_record, idem_ttl, index (bool),
# member, index_ttl, usage {field: increment}, tokens [int], hashes [str], known
# [[index, hash]] (UNKNOWN hashes a turn computed), meta {k: v}, from}; ARGV[2..]: the messages'
# records, as they are stored (not inside the JSON: no escaping to undo). With `from`
# (regenerate, edit and resend) the log is first cut back to before that seq.
# Answers {'ok', length} | {'lost'} | {'conflict'}.
# Messages are pushed a hundred at a time: `unpack` of thousands of values overflows Lua's
# C stack ("too many results to unpack"). Usage totals a turn leaves unchanged (no cache, say)
# are not written: a missing total reads as 0.
COMMIT_TURN = (
    _SLIDE_TTL
    + _TOUCH_INDEX
    + _TOKENS
    + _HASHES
    + _REWRITE
    + r"""
local p = cjson.decode(ARGV[1])
if redis.call('GET', KEYS[4]) ~= p.lock then
  -- A client-side retry of a commit that already applied must not report a lost lease.
  if redis.call('HGET', KEYS[3], 'last_turn') == p.lock then
    return {'ok', redis.call('LLEN', KEYS[1])}
  end
  return {'lost'}
end
local length = redis.call('LLEN', KEYS[1])
if length ~= tonumber(p.expected) then
  redis.call('DEL', KEYS[4])
  return {'conflict'}
end
if redis.call('LLEN', KEYS[2]) ~= length then rebuild_tokens(KEYS[1], KEYS[2], length) end
-- Meta read once for what follows: the hash list's generations, the TTL, whether the
-- conversation is new, and the usage totals this turn adds to (written with the turn's fields).
local names, added = {'generation', 'hash_generation', 'ttl_seconds', 'created_at'}, {}
for field, value in pairs(p.usage) do
  if value ~= 0 then
    names[#names + 1] = field
    added[#added + 1] = value
  end
end
local read = redis.call('HMGET', KEYS[3], unpack(names))
align_hashes_to(KEYS[1], KEYS[8], KEYS[3], length, read[1] or '', read[2] or '')
for _, pair in ipairs(p.known) do
  if pair[1] < length then redis.call('LSET', KEYS[8], pair[1], pair[2]) end
end
if p.from then
  rewrite_from({KEYS[1], KEYS[2], KEYS[8]}, KEYS[3], KEYS[9], p.from)
  length = p.from - 1
end
local count = #ARGV - 1
for first = 1, count, 100 do
  local last = math.min(first + 99, count)
  length = redis.call('RPUSH', KEYS[1], unpack(ARGV, first + 1, last + 1))
  redis.call('RPUSH', KEYS[2], unpack(p.tokens, first, last))
  redis.call('RPUSH', KEYS[8], unpack(p.hashes, first, last))
end
local fields = {'updated_at', p.now, 'last_turn', p.lock}
for field, value in pairs(p.meta) do
  fields[#fields + 1] = field
  fields[#fields + 1] = value
end
if not read[4] then
  fields[#fields + 1] = 'created_at'
  fields[#fields + 1] = p.now
end
for i, value in ipairs(added) do  -- whole numbers: Lua's doubles are exact to 2^53
  fields[#fields + 1] = names[4 + i]
  fields[#fields + 1] = (tonumber(read[4 + i]) or 0) + value
end
redis.call('HSET', KEYS[3], unpack(fields))
set_ttl({KEYS[3], KEYS[1], KEYS[2], KEYS[8]}, tonumber(read[3] or p.ttl))
if p.idem then
  redis.call('SET', KEYS[5], p.idem_record, 'EX', p.idem_ttl)
  redis.call('SADD', KEYS[6], KEYS[5])
  redis.call('EXPIRE', KEYS[6], p.idem_ttl)
end
if p.index then touch_index(KEYS[7], p.now, p.member, p.index_ttl) end
redis.call('DEL', KEYS[4])
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

# KEYS: calibration   ARGV: model, base (the factor the new one was computed from; "" for none),
# new factor, TTL (0: none). Every replica computes the tenant's correction from its own cached
# copy (service/tokens.py decides the value): a new value replaces only the one it was computed
# from, or a lower one, so a rise another replica just stored is never undone by a replica that
# had not seen it yet. Answers the stored value.
SET_FACTOR = r"""
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored or stored == ARGV[2] or tonumber(ARGV[3]) > tonumber(stored) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  stored = ARGV[3]
end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return stored
"""

# KEYS: lock   ARGV: lock value.  1 if the lease was ours and is released.
RELEASE_LOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: meta, log, tok, hash[, index]   ARGV: now, default ttl, index member, index ttl, then
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
slide_ttl(KEYS[1], {KEYS[2], KEYS[3], KEYS[4]}, ARGV[2])
if #KEYS == 5 then touch_index(KEYS[5], ARGV[1], ARGV[3], ARGV[4]) end
if created then return 1 end
return 0
"""
)

# KEYS: log, meta, lock, idem set, tok, hash[, index]   ARGV: index member.
# Answers {'busy', pttl} while a turn holds the lock, else {'ok', existed}.
DELETE_CONVERSATION = r"""
if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', redis.call('PTTL', KEYS[3])} end
local existed = redis.call('EXISTS', KEYS[2])
for _, key in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', key) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6])
if #KEYS == 7 then redis.pcall('ZREM', KEYS[7], ARGV[1]) end
return {'ok', existed}
"""
