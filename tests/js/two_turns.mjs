// Two streamed turns through the Vercel AI SDK's OpenAI-compatible provider against the service's
// /v1/chat/completions. MODE=newest sends only each new message (the server keeps the history);
// MODE=full sends the whole conversation each time, as `useChat` does. Prints one JSON line.
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { streamText } from 'ai';

const { BASE_URL, API_KEY, CONVERSATION_ID, MODE = 'newest' } = process.env;
const provider = createOpenAICompatible({
  name: 'conversation-proxy',
  baseURL: BASE_URL,
  apiKey: API_KEY,
  headers: { 'X-Conversation-Id': CONVERSATION_ID },
  includeUsage: true,
});

const history = [];
const turns = [];
const errors = [];
for (const text of ['Hello there', 'And a second question']) {
  history.push({ role: 'user', content: text });
  const result = streamText({
    model: provider('m-vercel'),
    messages: MODE === 'full' ? [...history] : [history[history.length - 1]],
    onError: ({ error }) => errors.push(String(error)),
  });
  let reply = '';
  let deltas = 0;
  for await (const delta of result.textStream) {
    reply += delta;
    deltas += 1;
  }
  history.push({ role: 'assistant', content: reply });
  const response = await result.response;
  turns.push({
    reply,
    deltas,
    finishReason: await result.finishReason,
    usage: await result.usage,
    headers: response.headers,
  });
}
console.log(JSON.stringify({ turns, errors }));
process.exit(errors.length ? 1 : 0);
