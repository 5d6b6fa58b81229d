const img = document.getElementById("histogram");
if (DATA.histogram) img.src = DATA.histogram; else img.remove();
sortable(document.getElementById("subgraphs"), DATA.subgraphs, [
  {key: "size", label: "latents", numeric: true},
  {key: "id", label: "subgraph", numeric: true},
  {key: "n_edges", label: "edges", numeric: true},
  {key: "mean_weight", label: "mean Jaccard", numeric: true},
  {key: "activations", label: "activations (sum)", numeric: true},
  {key: "top_tokens", label: "top tokens of its most active latent"},
], s => {
  const tr = el("tr"), td = el("td"), a = el("a", "subgraph " + s.id);
  a.href = encodeURI(s.file);
  td.append(a);
  tr.append(el("td", String(s.size)), td, el("td", String(s.n_edges)), el("td", s.mean_weight.toFixed(3)),
            el("td", String(s.activations)), el("td", showTokens(s.top_tokens), "tok"));
  return tr;
}, "size", -1);
