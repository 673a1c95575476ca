// Loads a UI workflow, queues it from the page (so the page's workflow goes into the PNG metadata),
// waits for it, and returns the workflow as the page would save it afterwards.
module.exports = async (page, { workflow }) => {
  return await page.evaluate(async (workflow) => {
    const app = window.app;
    await app.loadGraphData(workflow, true, true, "keycheck");
    await app.queuePrompt(0, 1);
    for (let k = 0; k < 600; k++) {
      const h = await (await fetch("/queue")).json();
      if (!h.queue_running.length && !h.queue_pending.length) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const history = await (await fetch("/history")).json();
    await new Promise((r) => setTimeout(r, 1500));  // gallery images load
    const galleries = app.graph.nodes.filter((n) => n.dynasynGallery).map((n) => {
      const imgs = [...n.dynasynGallery.querySelectorAll("img")];
      return { type: n.type, images: imgs.length, loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
               captions: [...n.dynasynGallery.querySelectorAll("figcaption")].map((c) => c.textContent) };
    });
    return { saved: app.graph.serialize(), history, galleries };
  }, workflow);
};
