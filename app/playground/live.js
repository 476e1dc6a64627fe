// Live transcription: microphone -> AudioWorklet (24 kHz PCM16 chunks) -> the realtime WebSocket
// (OpenAI's transcription session, server VAD) -> one line per utterance as its deltas arrive: after the
// pause with a turn-based model, while the speaker is still talking with a Voxtral Realtime one.

import { base64, microphoneError } from "./audio.js";
import { ServerError, realtimeProtocols, realtimeUrl, request } from "./api.js";

const RATE = 24000;
const PREFIX = "conversation.item.input_audio_transcription.";

export class LiveSession {
  // hooks: utterance(itemId, startMs) -> {append(text), done(text), failed(message)}; status(text); level(peak);
  // error(message); ended()
  constructor(hooks) {
    this.hooks = hooks;
    this.utterances = new Map();
    this.speaking = false;
  }

  async start(model, language) {
    this.model = model;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
      });
    } catch (error) {
      throw new Error(microphoneError(error));
    }
    this.context = new AudioContext({ sampleRate: RATE });
    await this.context.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
    await this.connect(language);
    const source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "pcm-chunker", { processorOptions: { targetRate: RATE } });
    this.node.port.onmessage = ({ data }) => this.send(data);
    source.connect(this.node);
  }

  connect(language) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(realtimeUrl(this.model), realtimeProtocols());
      this.ws = ws;
      let created = false;
      ws.onmessage = (message) => {
        const event = JSON.parse(message.data);
        if (event.type === "session.created") {
          created = true;
          ws.send(JSON.stringify(sessionUpdate(this.model, language)));
          resolve();
        }
        this.handle(event);
      };
      ws.onclose = async (close) => {
        if (!created) reject(await refusal(close));
        else this.closed(close);
      };
    });
  }

  send({ pcm, peak }) {
    this.hooks.level(peak);
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(pcm) }));
  }

  handle(event) {
    const { type } = event;
    if (type === "input_audio_buffer.speech_started") {
      this.speaking = true;
      this.utterance(event.item_id, event.audio_start_ms);
      this.hooks.status("Hearing speech…");
    } else if (type === "input_audio_buffer.speech_stopped") {
      this.speaking = false;
      this.hooks.status("Transcribing…");
    } else if (type === PREFIX + "delta") {
      this.utterance(event.item_id).append(event.delta);
    } else if (type === PREFIX + "completed") {
      this.utterance(event.item_id).done(event.transcript);
      this.utterances.delete(event.item_id);
      this.hooks.status(this.speaking ? "Hearing speech…" : "Listening…");
      this.finishIfStopping();
    } else if (type === PREFIX + "failed") {
      this.utterance(event.item_id).failed(event.error?.message || "transcription failed");
      this.utterances.delete(event.item_id);
      this.hooks.error(event.error?.message || "The transcription of an utterance failed.");
      this.finishIfStopping();
    } else if (type === "error") {
      this.errored = true;
      this.hooks.error(event.error?.message || "The server sent an error.");
    } else if (type === "session.updated") {
      this.hooks.status("Listening…");
    }
  }

  utterance(itemId, startMs) {
    if (!this.utterances.has(itemId)) this.utterances.set(itemId, this.hooks.utterance(itemId, startMs));
    return this.utterances.get(itemId);
  }

  // Stop the microphone; an utterance still being spoken is committed, and the socket closes once every
  // utterance has its transcript (the server answers committed audio in order).
  async stop() {
    this.stopping = true;
    await this.release();
    if (this.ws?.readyState === WebSocket.OPEN && this.speaking) {
      this.ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
      this.speaking = false;
    }
    this.hooks.status("Finishing…");
    this.finishIfStopping();
    // A commit the server refused (too little audio, say) answers with an error, not a transcript: do not
    // wait for ever on it.
    this.giveUp ??= setTimeout(() => this.ws?.close(1000), 30_000);
  }

  async release() {
    this.node?.disconnect();
    this.stream?.getTracks().forEach((track) => track.stop());
    if (this.context?.state !== "closed") await this.context?.close();
  }

  finishIfStopping() {
    const pending = [...this.utterances.values()].some((u) => !u.finished);
    if (this.stopping && !pending && this.ws?.readyState === WebSocket.OPEN) this.ws.close(1000);
  }

  async closed(close) {
    clearTimeout(this.giveUp);
    for (const utterance of this.utterances.values()) if (!utterance.finished) utterance.failed("connection closed");
    // An error event (idle timeout, say) already said why; otherwise the close code is all there is.
    if (!this.stopping && !this.errored) {
      const reason = close.reason ? `: ${close.reason}` : "";
      this.hooks.error(`The realtime session closed (code ${close.code}${reason}).`);
    }
    await this.release();
    this.hooks.status(this.stopping ? "Stopped." : "The session ended.");
    this.hooks.ended();
  }
}

function sessionUpdate(model, language) {
  const transcription = language ? { model, language } : { model };
  return {
    type: "session.update",
    session: {
      type: "transcription",
      audio: {
        input: {
          format: { type: "audio/pcm", rate: RATE },
          transcription,
          turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
        },
      },
    },
  };
}

// A refused upgrade reaches a browser as a bare close (1006): the HTTP answer's body is not readable from a
// WebSocket. Ask the server the same question over HTTP to show its own message (a wrong key, say).
async function refusal(close) {
  try {
    await request("v1/models");
  } catch (error) {
    if (error instanceof ServerError) return error;
  }
  return new ServerError(`The server refused the realtime session (WebSocket close code ${close.code}).`);
}
