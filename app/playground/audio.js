// Audio in the browser: record the microphone (MediaRecorder), decode with WebAudio, encode 16 kHz mono WAV.

const RATE = 16000; // Voxtral's rate: a smaller upload than the device's 48 kHz, and nothing for the server to resample

// Decode any container the browser knows into 16 kHz mono samples (decodeAudioData resamples to the context's rate).
export async function decodeMono(blob) {
  const bytes = await blob.arrayBuffer();
  const context = new OfflineAudioContext(1, 1, RATE);
  let buffer;
  try {
    buffer = await context.decodeAudioData(bytes);
  } catch {
    throw new Error("This browser cannot decode that audio; try a WAV, MP3, FLAC or Ogg file.");
  }
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const channel = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / buffer.numberOfChannels;
  }
  return mono;
}

export function wavBlob(samples, rate = RATE) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([view], { type: "audio/wav" });
}

export function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function microphoneError(error) {
  if (error.name === "NotAllowedError") return "Microphone access was refused: allow it in the browser's site settings.";
  if (error.name === "NotFoundError") return "No microphone found.";
  if (!window.isSecureContext) return "The microphone needs HTTPS (or localhost): open this page over https://.";
  return `Cannot use the microphone (${error.message}).`;
}

// One recording: start() asks for the microphone; stop() resolves to the clip as 16 kHz mono WAV.
export class Recorder {
  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    this.chunks = [];
    this.recorder = new MediaRecorder(this.stream);
    this.recorder.ondataavailable = (event) => event.data.size && this.chunks.push(event.data);
    this.stopped = new Promise((resolve) => (this.recorder.onstop = resolve));
    this.started = performance.now();
    this.recorder.start(250);
  }

  get seconds() {
    return (performance.now() - this.started) / 1000;
  }

  async stop() {
    this.recorder.stop();
    this.stream.getTracks().forEach((track) => track.stop());
    await this.stopped;
    const recorded = new Blob(this.chunks, { type: this.recorder.mimeType });
    const samples = await decodeMono(recorded);
    if (samples.length === 0) throw new Error("The recording is empty: the microphone sent no audio.");
    return { blob: wavBlob(samples), seconds: samples.length / RATE };
  }
}
