// Page-side: builds a graph from a compact spec (nodes, widget values by name, links by input/output
// name, groups by the nodes they frame), exactly as a user would. Pass it to page.evaluate; it returns
// {spec id: graph node id}.
// Self-contained on purpose: playwright sends its source to the page.
module.exports.buildGraph = (spec) => {
  const LG = window.LiteGraph, app = window.app;
  app.graph.clear();
  const made = {};
  for (const n of spec.nodes) {
    const node = LG.createNode(n.type);
    if (!node) throw new Error("unknown node type " + n.type);
    node.pos = n.pos;
    if (n.title) node.title = n.title;
    if (n.mode != null) node.mode = n.mode;  // 2 = muted (Ctrl+M), 4 = bypassed
    if (n.color) { node.color = n.color[0]; node.bgcolor = n.color[1]; }
    app.graph.add(node);
    for (const [name, v] of Object.entries(n.widgets || {})) {
      const w = name === "" ? node.widgets?.[0] : node.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${n.type} has no widget ${JSON.stringify(name)}`);
      w.value = v;
    }
    for (const w of spec.keepControls ? [] : node.widgets || []) {  // every seed fixed: a re-queue gives the same result
      if (w.linkedWidgets?.[0] && ["fixed", "randomize", "increment", "decrement"].includes(w.linkedWidgets[0].value)) {
        w.linkedWidgets[0].value = "fixed";
      }
    }
    if (n.properties) Object.assign(node.properties, n.properties);
    if (n.size) node.size = n.size; else node.setSize(node.computeSize());
    made[n.id] = node;
  }
  for (const n of spec.nodes) {
    for (const [input, [src, out]] of Object.entries(n.links || {})) {
      const to = made[n.id], from = made[src];
      const slot = to.inputs.findIndex((i) => i.name === input);
      const outSlot = typeof out === "number" ? out : from.outputs.findIndex((o) => o.name === out);
      if (slot < 0 || outSlot < 0) throw new Error(`cannot link ${src}.${out} -> ${n.id}.${input}`);
      if (!from.connect(outSlot, to, slot)) throw new Error(`link refused: ${src}.${out} -> ${n.id}.${input}`);
    }
  }
  // groups: [{title, nodes: [spec ids], color}] framing their nodes (and the nodes' titles) with a margin
  for (const g of spec.groups || []) {
    const members = g.nodes.map((id) => made[id]);
    if (members.some((n) => !n)) throw new Error(`group ${g.title} names a node that is not in the spec`);
    const title = LG.NODE_TITLE_HEIGHT ?? 30, pad = 24, head = 48;
    const x0 = Math.min(...members.map((n) => n.pos[0])) - pad;
    const y0 = Math.min(...members.map((n) => n.pos[1] - title)) - head;
    const x1 = Math.max(...members.map((n) => n.pos[0] + n.size[0])) + pad;
    const y1 = Math.max(...members.map((n) => n.pos[1] + n.size[1])) + pad;
    const group = new LG.LGraphGroup(g.title);
    if (g.color) group.color = g.color;
    app.graph.add(group);
    group.pos = [x0, y0];
    group.size = [x1 - x0, y1 - y0];
  }
  return Object.fromEntries(Object.entries(made).map(([k, node]) => [k, node.id]));
};
