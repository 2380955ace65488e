"""The page at ``/``: upload a face, write a prompt, pick a few settings, see the image.

Plain HTML and a few lines of script posting ``multipart/form-data`` to
``/v1/generate`` (no external assets: it works offline and on an air-gapped box).
"""
from __future__ import annotations

import html
from typing import Any, Dict

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>InfiniteID-RT</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;padding:0 1em;color:#222}}
label{{display:block;margin:.6em 0 .2em}} input[type=text],textarea{{width:100%}}
.row{{display:flex;gap:1em;flex-wrap:wrap}} .row label{{flex:1}}
#status{{margin:1em 0;min-height:1.2em}} #status.error{{color:#b00020}}
#result{{max-width:100%;image-rendering:pixelated;display:none;border:1px solid #ccc}}
</style></head><body>
<h1>InfiniteID-RT</h1>
<p>Bundle <code>{bundle}</code> on <code>{backend}</code>; batches of up to {max_batch}.</p>
<form id="form">
<label for="face">Face photo</label><input id="face" name="face" type="file" accept="image/png,image/jpeg,image/webp,image/bmp" required>
<label for="prompt">Prompt</label><textarea id="prompt" name="prompt" rows="2" required>a photo of a person in comic book style</textarea>
<label for="negative_prompt">Negative prompt</label><input id="negative_prompt" name="negative_prompt" type="text">
<div class="row">
<label>Steps <input id="steps" name="steps" type="number" min="1" max="1000" value="{steps}"></label>
<label>Seed <input id="seed" name="seed" type="number" min="0" value="0"></label>
<label>Guidance <input id="guidance" name="guidance" type="number" min="1" step="0.5" value="5"></label>
<label>Height <input id="height" name="height" type="number" step="{multiple}" value="{height}"></label>
<label>Width <input id="width" name="width" type="number" step="{multiple}" value="{width}"></label>
</div>
<p><button id="go" type="submit">Generate</button></p>
</form>
<div id="status"></div>
<img id="result" alt="generated image">
<script>
const form = document.getElementById("form"), statusEl = document.getElementById("status"),
      img = document.getElementById("result"), go = document.getElementById("go");
form.addEventListener("submit", async (ev) => {{
  ev.preventDefault();
  go.disabled = true; statusEl.className = ""; statusEl.textContent = "generating...";
  const t0 = performance.now();
  try {{
    const r = await fetch("/v1/generate", {{method: "POST", body: new FormData(form), headers: {{"Accept": "image/png"}}}});
    if (!r.ok) {{
      let msg = r.status + " " + r.statusText;
      try {{ const j = await r.json(); msg = j.error || msg; }} catch (e) {{}}
      throw new Error(msg);
    }}
    const blob = await r.blob();
    img.onload = () => {{ img.style.display = "block"; }};
    img.src = URL.createObjectURL(blob);
    statusEl.textContent = "done in " + ((performance.now() - t0) / 1000).toFixed(2) + " s (batch of " + (r.headers.get("X-Batch-Size") || "?") + ")";
  }} catch (e) {{
    statusEl.className = "error"; statusEl.textContent = "error: " + e.message;
  }} finally {{ go.disabled = false; }}
}});
</script>
</body></html>
"""


def render(info: Dict[str, Any]) -> str:
    esc = {k: html.escape(str(v)) for k, v in info.items()}
    return PAGE.format(
        bundle=esc.get("bundle", ""), backend=esc.get("backend", ""), max_batch=esc.get("max_batch", ""),
        steps=esc.get("default_steps", 30), height=esc.get("default_height", 1024), width=esc.get("default_width", 1024),
        multiple=esc.get("resolution_multiple", 8),
    )
