// AudioWorklet: the microphone as 16-bit mono PCM at the rate the realtime session expects (24 kHz), posted to
// the page in ~100 ms chunks (the page base64-encodes each into one input_audio_buffer.append event).
// Runs on the audio thread: no allocation beyond one chunk buffer, linear resampling when the context's rate
// is not the target (Chromium honours AudioContext({sampleRate: 24000}); other browsers may not).

class PcmChunker extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 24000, chunkMs = 100 } = options.processorOptions || {};
    this.step = sampleRate / targetRate; // input samples per output sample
    this.pos = 0; // fractional read position into the current input block
    this.last = 0; // the previous block's last sample, for interpolation across blocks
    this.size = Math.round((targetRate * chunkMs) / 1000);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    const mono = new Float32Array(n);
    for (const channel of channels) for (let i = 0; i < n; i++) mono[i] += channel[i] / channels.length;
    while (this.pos < n) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      // Positions count from the previous block's last sample (a one-sample delay), so both ends always exist.
      const a = i === 0 ? this.last : mono[i - 1];
      this.push(a + (mono[i] - a) * frac);
      this.pos += this.step;
    }
    this.pos -= n;
    this.last = mono[n - 1];
    return true;
  }

  push(sample) {
    const s = Math.max(-1, Math.min(1, sample));
    this.peak = Math.max(this.peak, Math.abs(s));
    this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.filled === this.size) {
      this.port.postMessage({ pcm: this.chunk.buffer, peak: this.peak }, [this.chunk.buffer]);
      this.chunk = new Int16Array(this.size);
      this.filled = 0;
      this.peak = 0;
    }
  }
}

registerProcessor("pcm-chunker", PcmChunker);
