// Builds a tiny training graph in the page, queues it from the page, and watches the loss chart
// fill from the server's dynasyn.train events; returns what the chart holds and how much it drew.
module.exports = async (page, { image, masks, steps }) => {
  const id = await page.evaluate(async ({ image, masks, steps }) => {
    const app = window.app, LG = window.LiteGraph;
    app.graph.clear();
    const add = (type, pos, widgets = {}) => {
      const n = LG.createNode(type); n.pos = pos; app.graph.add(n);
      for (const [k, v] of Object.entries(widgets)) n.widgets.find((w) => w.name === k).value = v;
      return n;
    };
    const link = (a, out, b, input) => a.connect(out, b, b.inputs.findIndex((i) => i.name === input));
    const model = add("DynASynTinyModel", [0, 0]);
    const img = add("LoadImage", [0, 200], { image });
    const m1 = add("LoadImageMask", [0, 600], { image: masks[0], channel: "red" });
    const m2 = add("LoadImageMask", [0, 900], { image: masks[1], channel: "red" });
    const batch = add("DynASynMaskBatch", [300, 600]);
    link(m1, 0, batch, "mask_1"); link(m2, 0, batch, "mask_2");
    const train = add("DynASynTrain", [400, 0], { class_nouns: "ball, box", phase1_steps: steps[0], phase2_steps: steps[1],
      resolution: 64, preview_every: 2, run_name: "chart_" + Date.now(), save_checkpoint: false });
    for (const [i, name] of [[0, "model"], [1, "clip"], [2, "vae"]]) link(model, i, train, name);
    link(img, 0, train, "image"); link(batch, 0, train, "masks");
    const save = add("SaveImage", [800, 0]);
    link(train, 3, save, "images");
    app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.8; app.canvas.setDirty(true, true);
    const res = await app.queuePrompt(0, 1);
    return train.id;
  }, { image, masks, steps });
  const total = steps[0] + steps[1];
  await page.waitForFunction(({ id, total }) => {
    const c = window.app.graph.getNodeById(id)?.dynasynChart;
    return c && c.last && c.last.step === total;
  }, { id, total }, { timeout: 300000, polling: 250 });
  await page.waitForTimeout(300);
  return await page.evaluate((id) => {
    const c = window.app.graph.getNodeById(id).dynasynChart;
    const ctx = c.canvas.getContext("2d");
    const px = ctx.getImageData(0, 0, c.canvas.width, c.canvas.height).data;
    let drawn = 0;
    for (let i = 0; i < px.length; i += 4) if (Math.abs(px[i] - 27) + Math.abs(px[i + 1] - 27) + Math.abs(px[i + 2] - 27) > 30) drawn++;
    return { steps: c.steps, terms: Object.keys(c.terms), head: c.head.textContent, drawn, pixels: px.length / 4,
             preview: c.preview.style.display };
  }, id);
};
