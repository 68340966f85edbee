/**
 * @file The CLIP byte-level BPE tokenizer, as openai/CLIP `clip/simple_tokenizer.py` does it (the
 * same merges and rules HF `CLIPTokenizer` and open_clip use): text clean-up, lower-casing, the
 * word regex, BPE merges by rank, and the 77-token windows SD1 (pad with EOS) and SD2 (pad with 0)
 * feed their text encoders.
 *
 * ```ts
 * const tok = await ClipTokenizer.load();
 * tok.bpe('a photo of a cat');          // [320, 1125, 539, 320, 2368]
 * tok.encode('a photo of a cat', 'eos'); // [49406, 320, …, 49407, 49407, …] (77 ids)
 * ```
 */
import { readFile } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';

/** The merges file shipped with openai/CLIP; every SD1/SD2 text encoder uses it. */
export const DEFAULT_VOCAB_PATH = fileURLToPath(new URL('./bpe_simple_vocab_16e6.txt.gz', import.meta.url));

export const BOS_ID = 49406; // <|startoftext|>
export const EOS_ID = 49407; // <|endoftext|>
/** Token window of every CLIP text encoder: BOS + 75 tokens + EOS. */
export const CONTEXT_LENGTH = 77;
export const MAX_BPE_TOKENS = CONTEXT_LENGTH - 2;

/**
 * Padding after EOS: 'eos' repeats 49407 (HF CLIPTokenizer in ldm FrozenCLIPEmbedder / webui
 * SD1), 'zero' pads with id 0 (open_clip.tokenize, SD2).
 */
export type Padding = 'eos' | 'zero';

/** simple_tokenizer.py `bytes_to_unicode`: printable bytes map to themselves, others to U+0100+. */
function bytesToUnicode(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const table: string[] = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCodePoint(printable(b) ? b : 256 + n++);
  return table;
}

/** The vocab order of `bytes_to_unicode().values()`: printable bytes first, then the rest. */
function byteVocabOrder(table: string[]): string[] {
  const printable: string[] = [];
  const rest: string[] = [];
  table.forEach((ch, b) => (ch.codePointAt(0) === b ? printable : rest).push(ch));
  return [...printable, ...rest];
}

/**
 * The word regex of simple_tokenizer.py (python `regex`, IGNORECASE). `\s` there is Unicode
 * White_Space, which `\p{White_Space}` spells in JS.
 */
const WORD_RE =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+/giu;

const NAMED_ENTITIES: Record<string, string> = {
  amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: '\u00a0', copy: '\u00a9', reg: '\u00ae',
  hellip: '\u2026', mdash: '\u2014', ndash: '\u2013', lsquo: '\u2018', rsquo: '\u2019',
  ldquo: '\u201c', rdquo: '\u201d', times: '\u00d7', deg: '\u00b0',
};

/** A basic `html.unescape`: numeric references and the common named ones (with `;`). */
export function htmlUnescape(text: string): string {
  return text.replace(/&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);/g, (whole, body: string) => {
    if (body[0] !== '#') return NAMED_ENTITIES[body] ?? whole;
    const cp = body[1] === 'x' || body[1] === 'X' ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
    // python html.unescape: 0, surrogates and out-of-range code points become U+FFFD
    if (cp === 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return '\ufffd';
    return String.fromCodePoint(cp);
  });
}

/**
 * Stand-in for `ftfy.fix_text` with its default fixes that need no tables of mojibake: remove
 * control characters, uncurl quotes, expand Latin ligatures, fold full-width forms (NFKC of
 * U+FF01–U+FFEE), then NFC. Curly apostrophes are common in prompts and change the tokens
 * ("don’t" → `don ' t` like "don't").
 */
export function fixText(text: string): string {
  return text
    .replace(/[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]/g, '')
    .replace(/[\u02bc\u2018-\u201b]/g, "'")
    .replace(/[\u201c-\u201f]/g, '"')
    .replace(/[\ufb00-\ufb06]/g, (c) => c.normalize('NFKC'))
    .replace(/[\uff01-\uffee]/g, (c) => c.normalize('NFKC'))
    .normalize('NFC');
}

/** simple_tokenizer.py `basic_clean` + `whitespace_clean` + `.lower()`. */
export function cleanText(text: string): string {
  const basic = htmlUnescape(htmlUnescape(fixText(text))).trim();
  return basic.replace(/\p{White_Space}+/gu, ' ').trim().toLowerCase();
}

export class ClipTokenizer {
  private readonly byteEncoder = bytesToUnicode();
  private readonly cache = new Map<string, number[]>();

  private constructor(
    /** token string (byte-unicode, `</w>` ends a word) → id */
    private readonly encoder: Map<string, number>,
    /** "first second" → merge rank (lower merges first) */
    private readonly ranks: Map<string, number>,
  ) {}

  /** Read the gzipped merges file (default: the copy shipped next to this module). */
  static async load(vocabPath: string = DEFAULT_VOCAB_PATH): Promise<ClipTokenizer> {
    const lines = gunzipSync(await readFile(vocabPath)).toString('utf8').split('\n');
    // simple_tokenizer.py: merges = lines[1 : 49152-256-2+1] (line 0 is the version header)
    const merges = lines.slice(1, 49152 - 256 - 2 + 1).map((l) => l.split(' ') as [string, string]);
    const bytes = byteVocabOrder(bytesToUnicode());
    const vocab = [...bytes, ...bytes.map((b) => `${b}</w>`), ...merges.map(([a, b]) => a + b)];
    vocab.push('<|startoftext|>', '<|endoftext|>');
    if (vocab.length !== EOS_ID + 1) throw new Error(`${vocabPath}: vocab has ${vocab.length} entries, expected ${EOS_ID + 1}`);
    const encoder = new Map(vocab.map((v, i) => [v, i]));
    const ranks = new Map(merges.map(([a, b], i) => [`${a} ${b}`, i]));
    return new ClipTokenizer(encoder, ranks);
  }

  /** Token ids of `text` without BOS/EOS and untruncated (what the webui's chunking starts from). */
  bpe(text: string): number[] {
    const ids: number[] = [];
    for (const word of cleanText(text).match(WORD_RE) ?? []) ids.push(...this.wordIds(word));
    return ids;
  }

  /** 77 ids: BOS + bpe[:75] + EOS, then padding (EOS for SD1, 0 for SD2). */
  encode(text: string, padding: Padding): number[] {
    return windowIds(this.bpe(text), padding);
  }

  /** The ids of one regex match (its UTF-8 bytes mapped to unicode, then BPE-merged). */
  private wordIds(word: string): number[] {
    const cached = this.cache.get(word);
    if (cached) return cached;
    let ids: number[];
    if (word === '<|startoftext|>' || word === '<|endoftext|>') ids = [this.encoder.get(word)!];
    else {
      const chars = [...Buffer.from(word, 'utf8')].map((b) => this.byteEncoder[b]!);
      ids = this.merge(chars).map((t) => this.encoder.get(t)!);
    }
    this.cache.set(word, ids);
    return ids;
  }

  /** simple_tokenizer.py `bpe`: repeatedly merge the lowest-ranked adjacent pair everywhere. */
  private merge(chars: string[]): string[] {
    let word = [...chars.slice(0, -1), `${chars[chars.length - 1]}</w>`];
    while (word.length > 1) {
      let best = '';
      let bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const rank = this.ranks.get(`${word[i]} ${word[i + 1]}`);
        if (rank !== undefined && rank < bestRank) [best, bestRank] = [`${word[i]} ${word[i + 1]}`, rank];
      }
      if (bestRank === Infinity) break;
      const [first, second] = best.split(' ') as [string, string];
      const next: string[] = [];
      for (let i = 0; i < word.length; i++) {
        if (word[i] === first && word[i + 1] === second) next.push(first + second), i++;
        else next.push(word[i]!);
      }
      word = next;
    }
    return word;
  }
}

/** BOS + tokens[:75] + EOS padded to 77 (EOS is always kept last when tokens are cut). */
export function windowIds(tokens: number[], padding: Padding): number[] {
  const ids = [BOS_ID, ...tokens.slice(0, MAX_BPE_TOKENS), EOS_ID];
  const pad = padding === 'eos' ? EOS_ID : 0;
  while (ids.length < CONTEXT_LENGTH) ids.push(pad);
  return ids;
}

/** A prompt's 77 ids with Textual Inversion placeholders, and where each embedding's vectors go. */
export interface TokenizedPrompt {
  ids: number[];
  /** Per embedding occurrence: positions in `ids` (BOS = 0) that get its vectors, in order. */
  embeddings: { name: string; positions: number[] }[];
  /** Tokens (or an embedding that did not fit) were cut off after 75 tokens. */
  truncated: boolean;
}

/**
 * Tokenize a prompt the way the webui does for Textual Inversion (modules/sd_hijack_clip.py
 * `tokenize_line` + textual_inversion.py `EmbeddingDatabase.find_embedding_at_position`): an
 * embedding is found by its name's BPE tokens (the longest match wins), and its tokens are
 * replaced by `numVectors` placeholder ids 0; EmbeddingsWithFixes later puts the vectors at
 * those positions. Only the first 75-token window is produced (a longer prompt is truncated;
 * the webui moves an embedding that would cross the window's end to the next chunk).
 */
export function tokenizeWithEmbeddings(
  tokenizer: ClipTokenizer,
  prompt: string,
  embeddings: Map<string, number>,
  padding: Padding,
): TokenizedPrompt {
  const lookup = embeddingLookup(tokenizer, embeddings);
  const bpe = tokenizer.bpe(prompt);
  const tokens: number[] = [];
  const found: TokenizedPrompt['embeddings'] = [];
  let truncated = false;
  for (let pos = 0; pos < bpe.length; ) {
    const match = (lookup.get(bpe[pos]!) ?? []).find((m) => m.ids.every((id, j) => bpe[pos + j] === id));
    const emitted = match ? (embeddings.get(match.name) ?? 0) : 1;
    if (tokens.length + emitted > MAX_BPE_TOKENS) {
      truncated = true;
      break;
    }
    if (match) {
      found.push({ name: match.name, positions: Array.from({ length: emitted }, (_, i) => 1 + tokens.length + i) });
      tokens.push(...new Array<number>(emitted).fill(0));
      pos += match.ids.length;
    } else tokens.push(bpe[pos++]!);
  }
  return { ids: windowIds(tokens, padding), embeddings: found, truncated };
}

/** first BPE id → candidate embeddings, longest token sequence first (webui ids_lookup). */
function embeddingLookup(tokenizer: ClipTokenizer, embeddings: Map<string, number>): Map<number, { name: string; ids: number[] }[]> {
  const lookup = new Map<number, { name: string; ids: number[] }[]>();
  for (const [name, numVectors] of embeddings) {
    if (!Number.isInteger(numVectors) || numVectors < 1 || numVectors > MAX_BPE_TOKENS) {
      throw new Error(`embedding '${name}': numVectors must be 1..${MAX_BPE_TOKENS}, got ${numVectors}`);
    }
    const ids = tokenizer.bpe(name);
    if (ids.length === 0) throw new Error(`embedding '${name}': the name has no tokens`);
    const list = lookup.get(ids[0]!) ?? [];
    list.push({ name, ids });
    list.sort((a, b) => b.ids.length - a.ids.length); // stable: ties keep insertion order
    lookup.set(ids[0]!, list);
  }
  return lookup;
}
